"""A RabbitMQ definitions file with one user per role of mcard-tasks (for compose).

RabbitMQ imports such a file at boot (``definitions.local.path``) or on demand
(``rabbitmqctl import_definitions``). Passwords are never stored: each user gets RabbitMQ's
salted SHA-256 hash (``rabbit_password_hashing_sha256``: base64 of a 4-byte salt followed by
SHA-256 of salt + password).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Mapping
from typing import Any

from mcard_tasks.errors import ConfigurationError
from mcard_tasks.roles import ROLES, permissions

__all__ = ["definitions", "password_hash", "password_variable"]

HASHING = "rabbit_password_hashing_sha256"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's stored form of password."""
    salt = secrets.token_bytes(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def password_variable(role: str) -> str:
    """The environment variable holding role's broker password."""
    return f"MCARD_BROKER_PASSWORD_{role.upper()}"


def definitions(
    vhost: str,
    users: Mapping[str, str],
    environ: Mapping[str, str] = os.environ,
    admin: str | None = None,
) -> dict[str, Any]:
    """The definitions of vhost with a user per role (users: role to user name), each with
    its password from environ (password_variable) and its role's permissions; admin (with
    MCARD_BROKER_PASSWORD_ADMIN) an administrator for people, used by no component."""
    missing = [
        password_variable(role) for role in users if not environ.get(password_variable(role))
    ]
    if admin is not None and not environ.get(password_variable("admin")):
        missing.append(password_variable("admin"))
    if missing:
        raise ConfigurationError(f"set the broker passwords {', '.join(missing)}")
    unknown = sorted(set(users) - set(ROLES))
    if unknown:
        raise ConfigurationError(f"unknown roles {', '.join(unknown)}: one of {', '.join(ROLES)}")
    listed = [
        {
            "name": name,
            "password_hash": password_hash(environ[password_variable(role)]),
            "hashing_algorithm": HASHING,
            "tags": "",
        }
        for role, name in users.items()
    ]
    granted = []
    for role, name in users.items():
        try:
            allowed = permissions(role, name)
        except ValueError as exc:  # a subscriber name that cannot have queues of its own
            raise ConfigurationError(str(exc)) from exc
        granted.append(
            {
                "user": name,
                "vhost": vhost,
                "configure": allowed.configure,
                "write": allowed.write,
                "read": allowed.read,
            }
        )
    if admin is not None:
        listed.append(
            {
                "name": admin,
                "password_hash": password_hash(environ[password_variable("admin")]),
                "hashing_algorithm": HASHING,
                "tags": "administrator",
            }
        )
        granted.append(
            {"user": admin, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        )
    return {"users": listed, "vhosts": [{"name": vhost}], "permissions": granted}
