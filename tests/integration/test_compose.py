"""The compose stack's file and the very commands its containers run, run here directly."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mcard_tasks import app
from tests.fixtures import ROOT, SESSION, Worker, wait_for

pytestmark = pytest.mark.integration
ENTRYPOINT = ROOT / "worker" / "docker-entrypoint.sh"


def entrypoint_env(database_url: str, name: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return dict(
        os.environ,
        PATH=f"{venv_bin}:{os.environ['PATH']}",
        MCARD_DATABASE_URL=database_url,
        MCARD_WORKER_NAME=name,
    )


#: What docker-compose.yml requires (``${VAR:?message}``), each with no default.
BROKER_ROLES = ("admin", "deploy", "producer", "worker", "monitor", "operator", "subscriber")
DATABASE_ROLES = ("owner", "worker", "producer")
SECRETS = (
    *(f"MCARD_BROKER_PASSWORD_{role.upper()}" for role in BROKER_ROLES),
    "RABBITMQ_ERLANG_COOKIE",
    "POSTGRES_PASSWORD",
    *(f"MCARD_DATABASE_PASSWORD_{role.upper()}" for role in DATABASE_ROLES),
    "MCARD_FLOWER_PASSWORD",
)
#: The keys of docker-compose.yml whose values are secrets.
SECRET_KEYS = (
    "RABBITMQ_ERLANG_COOKIE",
    "POSTGRES_PASSWORD",
    "PGPASSWORD",
    *(f"MCARD_BROKER_PASSWORD_{role.upper()}" for role in BROKER_ROLES),
    *(f"MCARD_DATABASE_PASSWORD_{role.upper()}" for role in DATABASE_ROLES),
    "MCARD_FLOWER_PASSWORD",
)
COMPOSE = ROOT / "docker-compose.yml"
needs_docker_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose not installed"
)


def test_the_compose_file_ships_no_default_secret() -> None:
    text = COMPOSE.read_text()
    for default in ("change-me", "mcard-tasks-cluster-cookie", "mcard:mcard@", "guest:guest"):
        assert default not in text
    for key in SECRET_KEYS:
        values = re.findall(rf"^\s*{key}:\s*(.*)$", text, flags=re.MULTILINE)
        assert values, f"{key} is set somewhere"
        for value in values:
            assert re.fullmatch(r'"\$\{\w+:\?[^}]+\}"', value), f"{key}: {value} is required"
    passwords = re.findall(r"(?:amqp|postgresql)://[\w-]+:(\$\{[^}]*\}|[^@\s\"]*)@", text)
    assert len(passwords) >= 10, "every broker and database URL"
    for password in passwords:
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", password), f"{password}: not required"
    # $$NAME is compose's escape: the container's shell reads its own (required) variable.
    compose_text = re.sub(r"\$\$\w+", "", text)
    for name in SECRETS:
        assert f"${{{name}:?" in text, f"{name} is required"
        assert not re.search(rf"\$\{{{name}(:?-|-)", text), f"{name} has a default"
        assert f"${{{name}}}" not in compose_text and f"${name}" not in compose_text, name


def test_env_example_lists_every_secret_without_a_value() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    assigned = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert set(SECRETS) <= set(assigned), "every required secret is listed"
    assert all(not value for value in assigned.values()), "no real value in .env.example"
    assert "openssl rand -hex" in "\n".join(lines)
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def compose_config(
    tmp_path: Path, values: dict[str, str], *profile: str
) -> subprocess.CompletedProcess[str]:
    """docker-compose config with only values (in an env file) for the secrets."""
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "--env-file", str(env_file), *profile, "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_docker_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "cluster"]])
def test_the_compose_file_validates_with_its_secrets_and_uses_them(
    tmp_path: Path, profile: list[str]
) -> None:
    values = {name: secrets.token_hex(24) for name in SECRETS}
    done = compose_config(tmp_path, values, *profile)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    broker = {role: values[f"MCARD_BROKER_PASSWORD_{role.upper()}"] for role in BROKER_ROLES}
    database = {role: values[f"MCARD_DATABASE_PASSWORD_{role.upper()}"] for role in DATABASE_ROLES}
    # Each component logs in as its own role, none as an administrator.
    node = "rabbit1" if profile else "rabbitmq"
    for role in ("deploy", "worker", "monitor"):
        assert f"amqp://mcard-{role}:{broker[role]}@{node}:5672//" in out, role
    if not profile:
        for role in ("producer", "operator"):
            assert f"amqp://mcard-{role}:{broker[role]}@rabbitmq:5672//" in out, role
    assert f"mcard-admin:{broker['admin']}@" not in out
    assert "RABBITMQ_DEFAULT_USER" not in out and "RABBITMQ_DEFAULT_PASS" not in out
    for role in DATABASE_ROLES:
        assert f"postgresql://mcard_{role}:{database[role]}@postgres:5432/mcard" in out, role
    assert "postgresql://postgres:" not in out, "the superuser is in no component's URL"
    assert f"POSTGRES_PASSWORD: {values['POSTGRES_PASSWORD']}" in out
    assert "POSTGRES_USER: postgres" in out, "the superuser is not the application's role"
    assert f"MCARD_FLOWER_PASSWORD: {values['MCARD_FLOWER_PASSWORD']}" in out
    assert f"RABBITMQ_ERLANG_COOKIE: {values['RABBITMQ_ERLANG_COOKIE']}" in out
    assert out.count("MCARD_DECLARE: 'false'") + out.count('MCARD_DECLARE: "false"') >= 2
    assert "change-me" not in out and "mcard:mcard@" not in out


@needs_docker_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "cluster"], ["--profile", "tools"]])
def test_secrets_reach_containers_only_in_their_environment(
    tmp_path: Path, profile: list[str]
) -> None:
    """No command, entrypoint or health check holds a secret or expands one (a command line is
    in every host user's process list): each secret is only ever an environment entry."""
    values = {name: secrets.token_hex(24) for name in SECRETS}
    done = compose_config(tmp_path, values, *profile)
    assert done.returncode == 0, done.stderr
    environment_entry = re.compile(r"^\s+[A-Z_][A-Z0-9_]*: ")
    for line in done.stdout.splitlines():
        if "PASSWORD" in line or any(value in line for value in values.values()):
            assert environment_entry.match(line), f"a secret outside an environment: {line!r}"


@needs_docker_compose
@pytest.mark.parametrize("missing", SECRETS)
def test_the_compose_file_refuses_to_run_without_each_secret(tmp_path: Path, missing: str) -> None:
    values = {name: secrets.token_hex(24) for name in SECRETS if name != missing}
    for unset_or_empty in (values, {**values, missing: ""}):
        done = compose_config(tmp_path, unset_or_empty)
        assert done.returncode != 0, f"config passed without {missing}"
        assert f"set {missing} (see .env.example)" in done.stderr, done.stderr


def test_the_image_entrypoint_execs_the_worker_and_its_health_check_passes(
    sqlite_url: str, make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    name = f"entrypoint-{SESSION}@localhost"
    env = entrypoint_env(sqlite_url, name)
    with (tmp_path / "worker.log").open("wb") as log:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT), "worker"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: process.poll() is not None or app.control.ping(destination=[name], timeout=0.5),
            60,
            "the entrypoint's worker to answer",
        )
        assert process.poll() is None
        health = subprocess.run(
            ["sh", str(ENTRYPOINT), "mcard-tasks", "health"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stdout + health.stderr
        process.send_signal(signal.SIGTERM)  # exec'd: the signal reaches the worker itself
        assert process.wait(30) == 0, "SIGTERM is a warm shutdown, exit 0"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
