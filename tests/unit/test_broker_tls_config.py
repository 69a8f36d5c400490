"""TLS settings of the broker: validation, Celery's broker_use_ssl, and the host name that
each connection (clone, failover switch) verifies. No broker."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from mcard_tasks.application import celery_config, create_app
from mcard_tasks.config import Settings
from mcard_tasks.tls import HostTLS, VerifiedConnection, tls_failure


@pytest.fixture(autouse=True)
def _project_app_stays_current() -> Iterator[None]:
    """The apps made here become Celery's current app: give that back to the project's."""
    yield
    from mcard_tasks import app

    app.set_current()


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its unencrypted key."""
    folder = tmp_path_factory.mktemp("pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=t"],
        cwd=folder, check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return folder / "cert.pem", folder / "key.pem"


def test_plain_amqp_has_no_tls() -> None:
    assert celery_config(Settings(broker_url="amqp://h//"))["broker_use_ssl"] is False


def test_amqps_verifies_certificate_and_host_with_the_system_store() -> None:
    options = celery_config(Settings(broker_url="amqps://u:p@broker.example//"))["broker_use_ssl"]
    assert isinstance(options, HostTLS)
    assert options == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}


def test_amqps_with_ca_and_client_certificate(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    settings = Settings(
        broker_url="amqps://h//",
        broker_ca_file=str(cert),
        broker_cert_file=str(cert),
        broker_key_file=str(key),
    )
    options = celery_config(settings)["broker_use_ssl"]
    assert options["ca_certs"] == str(cert)
    assert (options["certfile"], options["keyfile"]) == (str(cert), str(key))


def test_a_missing_file_names_the_setting_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=f"MCARD_BROKER_CA_FILE: cannot read {tmp_path}/x"):
        Settings(broker_url="amqps://h//", broker_ca_file=str(tmp_path / "x"))


def test_a_file_that_is_no_certificate_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValidationError, match=f"MCARD_BROKER_CA_FILE: {junk} holds no usable"):
        Settings(broker_url="amqps://h//", broker_ca_file=str(junk))


def test_a_ca_file_with_a_plain_url_is_refused(pem: tuple[Path, Path]) -> None:
    with pytest.raises(ValidationError, match="MCARD_BROKER_CA_FILE set, but MCARD_BROKER_URL"):
        Settings(broker_url="amqp://u:secret@h//", broker_ca_file=str(pem[0]))


def test_the_error_does_not_print_the_password(pem: tuple[Path, Path]) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(broker_url="amqp://u:secret@h//", broker_ca_file=str(pem[0]))
    assert "secret" not in str(caught.value)


def test_cert_and_key_go_together(pem: tuple[Path, Path]) -> None:
    with pytest.raises(ValidationError, match="MCARD_BROKER_CERT_FILE and MCARD_BROKER_KEY_FILE"):
        Settings(broker_url="amqps://h//", broker_cert_file=str(pem[0]))


def test_a_key_of_another_certificate_is_refused(pem: tuple[Path, Path], tmp_path: Path) -> None:
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-out", str(tmp_path / "other.key")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    with pytest.raises(ValidationError, match="are not a certificate and its unencrypted key"):
        Settings(
            broker_url="amqps://h//",
            broker_cert_file=str(pem[0]),
            broker_key_file=str(tmp_path / "other.key"),
        )


def test_mixed_schemes_are_refused() -> None:
    with pytest.raises(ValidationError, match="mixes amqps:// and plain URLs"):
        Settings(broker_url="amqps://a//;amqp://b//")


def test_each_connection_verifies_the_host_of_its_own_url() -> None:
    """kombu would write the first host into the shared options (and make localhost
    127.0.0.1); here every connection, clone and failover switch gets its own copy."""
    app = create_app(Settings(broker_url="amqps://u:p@localhost:5671//;amqps://u:p@b2:5671//"))
    shared = app.conf.broker_use_ssl
    connection = app.connection_for_write()
    assert isinstance(connection, VerifiedConnection)
    assert connection.ssl["server_hostname"] == "localhost"
    assert connection.ssl["cert_reqs"] == ssl.CERT_REQUIRED
    # What kombu's py-amqp transport does to the connection object when it connects.
    connection.hostname = "127.0.0.1"
    assert connection.clone().ssl["server_hostname"] == "localhost"
    connection.maybe_switch_next()
    assert (connection.hostname, connection.ssl["server_hostname"]) == ("b2", "b2")
    assert connection.clone().ssl["server_hostname"] == "b2"
    connection.maybe_switch_next()
    assert connection.ssl["server_hostname"] == "localhost"
    assert shared["server_hostname"] is None, "the app's options are never written"
    # Flower, the worker's consumer and the pools open theirs through the same app.
    assert app.connection().ssl["server_hostname"] == "localhost"
    assert app.connection_for_read().ssl["server_hostname"] == "localhost"


def test_tls_failure_names_the_host_and_the_reason() -> None:
    settings = Settings(broker_url="amqps://u:p@broker.example:5671//")
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'broker.example'."
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "unable to get local issuer certificate"
    wrapped = ConnectionError("cannot reach the broker")
    wrapped.__cause__ = untrusted
    assert "broker.example:5671 does not match its host name" in str(
        tls_failure(mismatch, settings)
    )
    assert "broker.example:5671 is not trusted" in str(tls_failure(wrapped, settings))
    assert tls_failure(ConnectionRefusedError(), settings) is None
