"""The URL forms of every topology, parsed before anything connects: a malformed URL is one
line (exit 64) that never shows the password."""

from __future__ import annotations

import pytest

from streambus.errors import InvalidInput
from streambus.store.urls import parse_url, redact
from tests.clitools import Cli, one_line_message


@pytest.mark.parametrize(("url", "kind", "tls", "hosts", "service", "db"), [
    ("redis://localhost:6379/2", "single", False, (("localhost", 6379),), "", 2),
    ("rediss://u:p@h:6380", "single", True, (("h", 6380),), "", 0),
    ("redis+cluster://a:7000,b:7001,c:7002", "cluster", False,
     (("a", 7000), ("b", 7001), ("c", 7002)), "", 0),
    ("rediss+cluster://u:p@a:7000?ssl_ca_certs=/ca.pem", "cluster", True, (("a", 7000),), "", 0),
    ("redis+sentinel://s1:26379,s2:26380/mymaster", "sentinel", False,
     (("s1", 26379), ("s2", 26380)), "mymaster", 0),
    ("rediss+sentinel://:pw@s1:26379/svc/3", "sentinel", True, (("s1", 26379),), "svc", 3),
    ("redis+sentinel://s1/svc", "sentinel", False, (("s1", 6379),), "svc", 0),
])
def test_every_form_parses(url: str, kind: str, tls: bool, hosts: tuple[tuple[str, int], ...],
                           service: str, db: int) -> None:
    endpoint = parse_url(url)
    assert (endpoint.kind, endpoint.tls, endpoint.hosts, endpoint.service, endpoint.db) == (
        kind, tls, hosts, service, db)


def test_credentials_are_read_and_never_shown() -> None:
    endpoint = parse_url("redis+cluster://alice:s3cr%40t@a:7000,b:7001")
    assert (endpoint.username, endpoint.password) == ("alice", "s3cr@t")
    assert "s3cr" not in endpoint.redacted
    assert endpoint.redacted == "redis+cluster://alice:***@a:7000,b:7001"
    assert redact("redis://h:1") == "redis://h:1"


MALFORMED = {
    "unknown scheme": "http://h:1",
    "no scheme": "localhost:6379",
    "no host": "redis+cluster://",
    "bad port": "redis+cluster://a:7000,b:notaport",
    "port out of range": "redis://h:70000",
    "sentinel without service": "redis+sentinel://s1:26379",
    "sentinel bad db": "redis+sentinel://s1:26379/svc/x",
    "cluster db": "redis+cluster://a:7000/3",
    "several hosts single": "redis://a:1,b:2",
    "unknown cluster option": "redis+cluster://a:7000?nonsense=1",
}


@pytest.mark.parametrize("url", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_urls_are_invalid_input_without_the_password(url: str) -> None:
    secret = url.replace("://", "://user:hunter2@", 1) if "://" in url else url
    with pytest.raises(InvalidInput) as caught:
        parse_url(secret)
    message = str(caught.value)
    assert "\n" not in message
    assert "hunter2" not in message
    assert "invalid Redis URL" in message


def test_cli_malformed_url_is_exit_64_with_one_line(cli: Cli) -> None:
    result = cli.run("status", "sw", "--redis-url", "redis+sentinel://u:hunter2@s1:26379")
    assert result.returncode == 64
    line = one_line_message(result.stderr)
    assert "no service name" in line
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("url", ["redis+cluster://127.0.0.1:1", "redis+sentinel://127.0.0.1:1/m"])
def test_cli_unreachable_seeds_or_sentinels_are_exit_4_with_one_line(cli: Cli, url: str) -> None:
    result = cli.run("signal", "sw", "ch", "--redis-url", url)
    assert result.returncode == 4
    assert one_line_message(result.stderr).startswith("streambus: bus unavailable")
