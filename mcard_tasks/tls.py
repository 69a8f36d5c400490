"""TLS to the broker: verified certificate and host name on every amqps:// connection.

How py-amqp 5.4 and kombu 5.7 really treat TLS (read in their source), and why this module:

- ``broker_use_ssl`` (kombu's ``ssl=``) is either True or a dict of keyword arguments for
  ``amqp.transport.SSLTransport._wrap_socket_sni`` (``ca_certs``, ``certfile``, ``keyfile``,
  ``cert_reqs``, ``server_hostname``, ...), not an ``ssl.SSLContext``. A ``context`` key is
  a dict of ``ssl.create_default_context`` arguments, not a context object.
- Host names are checked only when ``server_hostname`` is given: py-amqp sets
  ``check_hostname = server_hostname is not None``. A bare ``amqps://`` URL (``ssl=True``)
  verifies the chain against the system store but accepts a certificate of any name.
- kombu fills a ``server_hostname: None`` from the URL, but it writes the name into the
  shared options dict (Celery's ``broker_use_ssl`` itself): every later connection of the
  process, a failover to another host included, is then checked against the first host.
  It also rewrites the host ``localhost`` to ``127.0.0.1`` first, so the name checked would
  be the address, not the URL's host.

Hence :class:`HostTLS` (the options, resolved per host) and :class:`VerifiedConnection` (a
kombu Connection that gives each connection, clone and failover switch its own copy with the
current URL's host as ``server_hostname``), installed on the app through :class:`TLSAMQP`.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from celery.app.amqp import AMQP
from kombu.connection import Connection

if TYPE_CHECKING:
    from mcard_tasks.config import Settings

__all__ = [
    "TLSAMQP",
    "HostTLS",
    "VerifiedConnection",
    "broker_ssl_options",
    "tls_failure",
]


class HostTLS(dict[str, Any]):
    """py-amqp's TLS options whose ``server_hostname`` is the host of each connection."""

    def for_host(self, hostname: str | None) -> HostTLS:
        """A copy for a connection to hostname (the shared options are never written)."""
        previous = self.get("server_hostname")
        # kombu's py-amqp transport renames the host localhost to 127.0.0.1 on the
        # connection object when it connects; a clone of that connection is still the
        # URL's localhost, whose name the certificate carries.
        if previous == "localhost" and hostname == "127.0.0.1":
            hostname = previous
        return HostTLS(self, server_hostname=hostname or None)


class VerifiedConnection(Connection):
    """kombu's Connection, with HostTLS options resolved for the host it connects to."""

    def _init_params(self, **params: Any) -> None:  # type: ignore[override]
        # Called by __init__ (and so by clone) and by switch (a failover to the next URL),
        # always with keyword arguments and the host of the URL in use.
        options = params.get("ssl")
        if isinstance(options, HostTLS):
            params["ssl"] = options.for_host(params.get("hostname"))
        super()._init_params(**params)


class TLSAMQP(AMQP):  # type: ignore[misc]
    """Celery's AMQP helper, whose connections are VerifiedConnection (app.connection_for_*,
    the worker's consumer, events, gossip and pidbox, the producer pool, Flower)."""

    Connection = VerifiedConnection


def broker_ssl_options(settings: Settings) -> HostTLS | bool:
    """Celery's ``broker_use_ssl``: False for plain amqp:// URLs; for amqps:// the broker's
    certificate required and checked against MCARD_BROKER_CA_FILE (unset: the system's
    default CA store) and against the URL's host name; the client certificate when given."""
    if not settings.broker_tls:
        return False
    options = HostTLS(cert_reqs=ssl.CERT_REQUIRED, server_hostname=None)
    if settings.broker_ca_file:
        options["ca_certs"] = settings.broker_ca_file
    if settings.broker_cert_file and settings.broker_key_file:
        options["certfile"] = settings.broker_cert_file
        options["keyfile"] = settings.broker_key_file
    return options


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def tls_failure(exc: BaseException, settings: Settings) -> str | None:
    """A clear sentence when exc (or what caused it) is a failed TLS verification of the
    broker's certificate, naming the broker's host; None for any other error."""
    hosts = ", ".join(
        dict.fromkeys(
            f"{urlsplit(url).hostname}:{urlsplit(url).port or 5671}" for url in settings.broker_urls
        )
    )
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            reason = str(error.verify_message or error.reason or error)
            if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
                return (
                    f"TLS: the certificate of the broker {hosts} does not match its host name"
                    f" ({reason}); use the name the certificate was issued for in"
                    " MCARD_BROKER_URL"
                )
            return (
                f"TLS: the certificate of the broker {hosts} is not trusted ({reason});"
                " set MCARD_BROKER_CA_FILE to the CA that issued it"
            )
        if isinstance(error, ssl.SSLError):
            return f"TLS: the handshake with the broker {hosts} failed ({error})"
    return None
