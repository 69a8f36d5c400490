"""Flower for mcard-tasks: ``celery -A mcard_tasks flower`` reads these defaults.

Flower takes its options from FLOWER_* variables (a command-line flag still wins). The app
sets them from the MCARD_* settings when it is imported, before Flower parses its options:
basic auth from MCARD_FLOWER_USER / MCARD_FLOWER_PASSWORD (pages and API answer 401 without
them), read-only (no revoke or terminate of a mint from the UI or the API), the task columns
operators need, a task formatter that shows a rejection as ``REJECTED: <reason>`` rather than
SUCCESS (mcard_tasks.flower_display), and, without credentials, 127.0.0.1. Once Flower has
parsed its options (variables, config file, flags), the options it will really use are
checked: without authentication it may only listen on a loopback address or a unix socket,
and every basic auth entry must be a whole ``user:password``.

Flower opens its broker connections through the app (``capp.connection()``), so an amqps://
MCARD_BROKER_URL gives it the same verified TLS as every other process (mcard_tasks.tls).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from mcard_tasks.config import Settings
from mcard_tasks.errors import ConfigurationError

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "check_credentials",
    "check_options",
    "configure_flower",
    "configure_flower_if_running",
]

COLUMNS = "name,uuid,state,args,kwargs,result,received,started,runtime,worker"
#: The shortest MCARD_FLOWER_PASSWORD accepted (`openssl rand -hex 24` gives 48).
MIN_PASSWORD_LENGTH = 12
#: Exit code of a Flower process refused for its configuration (the CLI's "invalid").
EXIT_REFUSED = 2
CREDENTIALS_HINT = (
    "set MCARD_FLOWER_USER and MCARD_FLOWER_PASSWORD (Flower's basic auth; a password of at"
    f" least {MIN_PASSWORD_LENGTH} characters without commas, e.g. `openssl rand -hex 24`)"
)


def check_credentials(user: str | None, password: str | None) -> None:
    """Refuse MCARD_FLOWER_USER / MCARD_FLOWER_PASSWORD that Flower's basic auth would misuse.

    Flower reads FLOWER_BASIC_AUTH as a comma-separated list of ``user:password`` entries and
    accepts a request whose decoded ``user:password`` equals one entry: a comma in a password
    would make its tail a credential of its own, and a ``:`` in a user name is ambiguous.

    Raises:
        ConfigurationError: naming the setting and the rule it breaks (never the password).
    """
    if user is None and password is None:
        return
    if user is None or password is None:
        given, missing = (
            ("MCARD_FLOWER_USER", "MCARD_FLOWER_PASSWORD")
            if password is None
            else ("MCARD_FLOWER_PASSWORD", "MCARD_FLOWER_USER")
        )
        raise ConfigurationError(f"{given} is set but {missing} is not: set both, or neither")
    for problem in _credential_problems(user, password):
        raise ConfigurationError(f"unusable Flower credentials: {problem}")


def _credential_problems(user: str, password: str) -> list[str]:
    problems = []
    if not user:
        problems.append("MCARD_FLOWER_USER is empty")
    elif ":" in user or "," in user:
        problems.append("MCARD_FLOWER_USER may not contain ':' or ',' (basic auth separators)")
    if not password:
        problems.append("MCARD_FLOWER_PASSWORD is empty")
    elif "," in password:
        problems.append(
            "MCARD_FLOWER_PASSWORD may not contain ',': Flower splits its basic auth on commas,"
            " so the part after the comma would become a password on its own"
        )
    elif len(password) < MIN_PASSWORD_LENGTH:
        problems.append(
            f"MCARD_FLOWER_PASSWORD is shorter than {MIN_PASSWORD_LENGTH} characters"
            " (generate one with `openssl rand -hex 24`)"
        )
    return problems


def configure_flower(settings: Settings, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set Flower's defaults in environ from settings.

    Raises:
        ConfigurationError: the Flower credentials are unusable (see check_credentials).
    """
    check_credentials(settings.flower_user, settings.flower_password)
    environ.setdefault("FLOWER_READ_ONLY", "true")
    environ.setdefault("FLOWER_TASKS_COLUMNS", COLUMNS)
    if settings.flower_user and settings.flower_password:
        environ.setdefault(
            "FLOWER_BASIC_AUTH", f"{settings.flower_user}:{settings.flower_password}"
        )
    elif "FLOWER_BASIC_AUTH" not in environ:
        environ.setdefault("FLOWER_ADDRESS", "127.0.0.1")


def is_loopback(address: str) -> bool:
    """Whether Flower listening on address is reachable from this machine only.

    "" is Flower's default: every interface. A host name counts when every address it
    resolves to is a loopback address (Tornado listens on all of them).
    """
    if not address:
        return False
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        pass
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(address, None)}
    except OSError:
        return False
    return bool(resolved) and all(
        ipaddress.ip_address(str(ip).split("%")[0]).is_loopback for ip in resolved
    )


def check_options(
    *,
    address: str,
    port: int,
    unix_socket: str = "",
    basic_auth: Sequence[str] | None = (),
    oauth: str = "",
    read_only: bool = True,
) -> str:
    """Check the options Flower will serve with; return a true line saying how it serves.

    Raises:
        ConfigurationError: a basic auth entry is not ``user:password``, or Flower would
            serve without authentication on an address other machines can reach.
    """
    entries = list(basic_auth or [])
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not (sep and user and password):
            raise ConfigurationError(
                "Flower's basic auth has an entry that is not user:password (FLOWER_BASIC_AUTH"
                " and --basic-auth are comma-separated lists: a comma inside a password splits"
                f" it into a credential of its own); {CREDENTIALS_HINT}"
            )
    where = _where(address, port, unix_socket)
    mode = "read-only" if read_only else "NOT read-only: control actions enabled"
    if entries or oauth:
        method = "basic auth" if entries else "OAuth"
        return f"mcard-tasks: Flower serves on {where} with {method}, {mode}"
    if not unix_socket and not is_loopback(address):
        raise ConfigurationError(
            f"refusing to serve Flower without authentication on {where}: {CREDENTIALS_HINT},"
            " or serve on a loopback address (--address=127.0.0.1)"
        )
    return (
        f"mcard-tasks: MCARD_FLOWER_USER and MCARD_FLOWER_PASSWORD are not set: Flower serves"
        f" without authentication, on {where} only, {mode}"
    )


def _where(address: str, port: int, unix_socket: str) -> str:
    if unix_socket:
        return f"the unix socket {unix_socket} (any local user may connect)"
    if not address:
        return f"every interface, port {port}"
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}"


def check_parsed_flower_options(options: Any) -> str:
    """check_options on Tornado's parsed Flower options."""
    return check_options(
        address=options.address or "",
        port=int(options.port),
        unix_socket=options.unix_socket or "",
        basic_auth=options.basic_auth,
        oauth=options.auth or "",
        read_only=bool(options.read_only),
    )


def _refuse(exc: ConfigurationError) -> None:
    print(f"mcard-tasks: error: {exc}", file=sys.stderr)
    sys.exit(EXIT_REFUSED)


def _after_flower_parses(options: Any) -> Callable[[], None]:
    """A Tornado parse callback checking the options Flower really ends up with.

    Flower parses its command line once, then, when its config file exists, reads that file
    and parses the command line again: only the last parse is final.
    """
    parses = 0

    def check() -> None:
        nonlocal parses
        parses += 1
        if parses == 1 and os.path.exists(os.path.abspath(options.conf)):
            return  # the config file and a second parse come next
        try:
            print(check_parsed_flower_options(options), file=sys.stderr)
        except ConfigurationError as exc:
            _refuse(exc)

    return check


def configure_flower_if_running(settings: Settings) -> None:
    """In a `celery ... flower` process: set Flower's defaults, and check what Flower parses.

    A refused configuration ends the process with exit code 2 and a message on stderr.
    """
    if "flower" not in sys.argv[1:]:
        return
    try:
        configure_flower(settings)
    except ConfigurationError as exc:
        _refuse(exc)
    from flower.options import default_options

    from mcard_tasks.flower_display import ledger_lookup, task_formatter

    # A default: a format_task in Flower's config file still wins (it is parsed after this).
    default_options.format_task = task_formatter(ledger_lookup(settings))
    default_options.add_parse_callback(_after_flower_parses(default_options))
