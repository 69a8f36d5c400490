"""TLS to the broker, for real: an extra RabbitMQ node with only a TLS listener, a throwaway CA.

The node (its own name, ports and folder; the shared broker is not touched) serves a
certificate for DNS:localhost only. A plain TLS server beside it serves a certificate of the
same CA for another name (other.example). The checks:

1. amqps://...@localhost with MCARD_BROKER_CA_FILE: the app connects and publishes with a
   confirm, a worker started on the same settings answers a ping over TLS, and
   ``mcard-tasks health`` passes on all three checks.
2. A certificate for another name is refused, with a line naming the host and the mismatch
   (the other.example server; and the node itself reached as 127.0.0.1, which its
   certificate does not name: no address is taken for the name).
3. Without the CA file (the system store) the node's certificate is not trusted.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kombu.messaging import Producer

from mcard_tasks.application import create_app
from mcard_tasks.config import Settings
from mcard_tasks.tls import tls_failure
from tests.fixtures import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MCARD = [sys.executable, "-m", "mcard_tasks.cli"]


@pytest.fixture(autouse=True)
def _project_app_stays_current() -> Iterator[None]:
    """The apps made here become Celery's current app: give that back to the project's."""
    yield
    from mcard_tasks import app

    app.set_current()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(folder: Path, name: str, san: str) -> tuple[Path, Path]:
    """A server certificate signed by folder's CA (ca.pem / ca.key): (certificate, key)."""
    (folder / f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip
    return folder / f"{name}.pem", folder / f"{name}.key"


@dataclass
class Certificates:
    ca: Path
    localhost: tuple[Path, Path]
    other: tuple[Path, Path]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on the PATH")
    folder = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=mcard-tasks test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    return Certificates(
        ca=folder / "ca.pem",
        localhost=_issue(folder, "localhost", "DNS:localhost"),
        other=_issue(folder, "other", "DNS:other.example"),
    )


@dataclass
class TLSNode:
    name: str
    port: int
    folder: Path

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.name, "-q", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log_tail(self) -> str:
        logs = sorted((self.folder / "log").glob("*.log"))
        return logs[0].read_text()[-3000:] if logs else "(no log written)"


@pytest.fixture(scope="module")
def tls_node(certificates: Certificates) -> Iterator[TLSNode]:
    """An extra RabbitMQ node whose only listener is TLS on a free port of 127.0.0.1."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on the PATH")
    if os.geteuid() != 0:
        pytest.skip("the extra node runs as the rabbitmq user: needs root")
    label = uuid.uuid4().hex[:8]
    folder = Path(f"/tmp/mcard-tls-{label}")
    (folder / "mnesia").mkdir(parents=True)
    (folder / "log").mkdir()
    # The rabbitmq user reads the certificates and writes the data folder.
    for source in (certificates.ca, *certificates.localhost):
        shutil.copy(source, folder / source.name)
    port, dist_port = _free_port(), _free_port()
    (folder / "plugins").write_text("[].\n")
    (folder / "rabbitmq.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {folder / 'ca.pem'}\n"
        f"ssl_options.certfile = {folder / 'localhost.pem'}\n"
        f"ssl_options.keyfile = {folder / 'localhost.key'}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(folder)], check=True)
    folder.chmod(0o755)
    node = TLSNode(name=f"mcard-tls-{label}@localhost", port=port, folder=folder)
    env = dict(
        os.environ,
        RABBITMQ_NODENAME=node.name,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(_free_port()),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(folder / "mnesia"),
        RABBITMQ_LOG_BASE=str(folder / "log"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(folder / "plugins"),
        RABBITMQ_CONFIG_FILE=str(folder / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(folder / "advanced.config"),
        RABBITMQ_PID_FILE=str(folder / "node.pid"),
    )
    try:
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60)
        # await_startup fails for a few seconds after -detached ("not running at all").
        started = wait_for(
            lambda: node.ctl("await_startup", "--timeout", "5").returncode == 0,
            90,
            f"{node.name} to start",
            every=1,
        )
        assert started, node.log_tail()
        yield node
    finally:
        node.ctl("stop", timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def other_name_server(certificates: Certificates) -> Iterator[int]:
    """A TLS server (no AMQP behind it: the client refuses during the handshake) with a
    certificate of the same CA for other.example; yields its port on 127.0.0.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, certificates.other))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(5)
            try:
                with context.wrap_socket(client, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass  # the client refused the certificate, as expected
            finally:
                client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join(5)
    listener.close()


def _settings(url: str, **files: Path) -> Settings:
    return Settings(broker_url=url, **{key: str(path) for key, path in files.items()})


def _connect(settings: Settings) -> None:
    app = create_app(settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=10)
    finally:
        app.close()


def _health(env_changes: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCARD_BROKER_")}
    env.update(env_changes)
    return subprocess.run(
        [*MCARD, "health", "--timeout", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_verified_connection_publishes_and_a_worker_answers(
    tls_node: TLSNode, certificates: Certificates, tmp_path: Path
) -> None:
    url = f"amqps://guest:guest@localhost:{tls_node.port}//"
    settings = _settings(url, broker_ca_file=certificates.ca)
    app = create_app(settings)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=10)
        sock = connection.connection.transport.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.context.check_hostname and sock.context.verify_mode == ssl.CERT_REQUIRED
        assert sock.server_hostname == "localhost", "the URL's host, not kombu's 127.0.0.1"
        channel = connection.channel()
        channel.confirm_select()
        queue = f"tls-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue, auto_delete=True)
        Producer(channel).publish({"hello": "tls"}, routing_key=queue, serializer="json")
        assert channel.basic_get(queue, no_ack=True) is not None

    # A real worker on the same TLS settings, and the CLI's three checks through it.
    name = f"tls-{uuid.uuid4().hex[:8]}@localhost"
    env = {
        "MCARD_BROKER_URL": url,
        "MCARD_BROKER_CA_FILE": str(certificates.ca),
        "MCARD_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        "MCARD_WORKER_NAME": name,
        "MCARD_POOL": "solo",
    }
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith("MCARD_BROKER_")}
    worker_env.update(env)
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=ROOT,
            env=worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: worker.poll() is not None or app.control.ping(destination=[name], timeout=0.5),
            90,
            f"worker {name} to answer a ping over TLS",
        )
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        done = _health(env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "broker   ok    amqps://" in done.stdout
        assert name in done.stdout
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait(10)


def test_a_certificate_for_another_name_is_refused(
    tls_node: TLSNode, other_name_server: int, certificates: Certificates
) -> None:
    for url, host in (
        (f"amqps://guest:guest@localhost:{other_name_server}//", f"localhost:{other_name_server}"),
        # The node's own certificate names DNS:localhost only: its address is not its name.
        (f"amqps://guest:guest@127.0.0.1:{tls_node.port}//", f"127.0.0.1:{tls_node.port}"),
    ):
        settings = _settings(url, broker_ca_file=certificates.ca)
        with pytest.raises(Exception) as caught:
            _connect(settings)
        message = tls_failure(caught.value, settings)
        assert message is not None, repr(caught.value)
        assert host in message and "does not match its host name" in message

        done = _health({"MCARD_BROKER_URL": url, "MCARD_BROKER_CA_FILE": str(certificates.ca)})
        assert done.returncode == 4, done.stdout + done.stderr
        assert f"the certificate of the broker {host} does not match" in done.stdout


def test_without_the_ca_file_the_system_store_does_not_trust_it(tls_node: TLSNode) -> None:
    url = f"amqps://guest:guest@localhost:{tls_node.port}//"
    settings = _settings(url)
    with pytest.raises(Exception) as caught:
        _connect(settings)
    message = tls_failure(caught.value, settings)
    assert message is not None, repr(caught.value)
    assert f"localhost:{tls_node.port} is not trusted" in message

    started = time.monotonic()
    done = _health({"MCARD_BROKER_URL": url})
    assert done.returncode == 4, done.stdout + done.stderr
    assert f"the certificate of the broker localhost:{tls_node.port} is not trusted" in done.stdout
    assert time.monotonic() - started < 60
