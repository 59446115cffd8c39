"""Settings: where the bus is and how long things may take, from arguments or the environment."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Final

from streambus.errors import InvalidInput
from streambus.keys import validate_id
from streambus.store.urls import parse_url

ENV_URL: Final = "STREAMBUS_REDIS_URL"
ENV_URL_FILE: Final = "STREAMBUS_REDIS_URL_FILE"
"""A file holding the URL (a mounted secret): keeps the password out of ``ps`` and of the
environment of every child process."""
ENV_NAMESPACE: Final = "STREAMBUS_NAMESPACE"
DEFAULT_NAMESPACE: Final = "streambus"
DEFAULT_WAIT_TIMEOUT_S: Final = 30 * 60.0
DEFAULT_RECONNECT_BUDGET_S: Final = 300.0

_DURATION = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>ms|s|m|h)?")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Parse ``1.5``, ``500ms``, ``5s``, ``2m`` or ``1h`` into seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidInput(
            f"invalid duration {text!r}: use seconds (1.5) or a suffix (500ms, 5s, 2m, 1h)"
        )
    return float(match["number"]) * _UNIT_SECONDS[match["unit"]]


def _url_from_file() -> str | None:
    """The URL in the file ``STREAMBUS_REDIS_URL_FILE`` names (its first line), if set."""
    path = os.environ.get(ENV_URL_FILE)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            url = file.readline(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise InvalidInput(f"cannot read {ENV_URL_FILE} {path!r}: {why}") from None
    if not url:
        raise InvalidInput(f"{ENV_URL_FILE} {path!r} holds no URL")
    return url


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the bus is. ``redis_url=None`` means the embedded server of this user."""

    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE

    @classmethod
    def resolve(cls, redis_url: str | None = None, namespace: str | None = None) -> Settings:
        """Arguments first, then ``STREAMBUS_REDIS_URL`` (or the file named by
        ``STREAMBUS_REDIS_URL_FILE``) / ``STREAMBUS_NAMESPACE``."""
        url = redis_url or os.environ.get(ENV_URL) or _url_from_file() or None
        ns = namespace or os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE
        if url is not None:
            parse_url(url)  # a malformed URL is one line (exit 64) before anything connects
        return cls(redis_url=url, namespace=validate_id(ns, "namespace"))
