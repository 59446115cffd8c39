"""Logs as JSON lines: one object per record, with the fields a transition log carries.

Every state-transition log of the library passes its facts as ``extra`` (``coordinator``,
``swarm``, ``channel``, ``iteration``, ``outcome``, ``signal_id``, ``trace_id``, ``event``), so
:class:`JsonFormatter` can write them as fields next to ``ts``, ``level``, ``logger`` and
``message``. A record without a ``trace_id`` gets the current OpenTelemetry span's, if any.

The CLI uses it with ``--log-format json`` (or ``STREAMBUS_LOG_FORMAT=json``); a program that
embeds streambus attaches the formatter to its own handler::

    handler = logging.StreamHandler()
    handler.setFormatter(streambus.logs.JsonFormatter())
    logging.getLogger("streambus").addHandler(handler)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Final, Literal, TextIO

from streambus.errors import InvalidInput
from streambus.tracing import current_trace_id

ENV_LOG_FORMAT: Final = "STREAMBUS_LOG_FORMAT"
LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(message)s"

_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}
"""Attributes every record has; anything else on a record came in through ``extra``."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (ts in UTC, ISO 8601, ms)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_") and value not in (None, ""):
                out[name] = value
        if "trace_id" not in out and (trace_id := current_trace_id()):
            out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def resolve_log_format(given: str | None) -> LogFormat:
    """The format asked for on the command line, else in ``STREAMBUS_LOG_FORMAT``, else text."""
    value = given or os.environ.get(ENV_LOG_FORMAT) or "text"
    for known in LOG_FORMATS:
        if value == known:
            return known
    raise InvalidInput(f"invalid {ENV_LOG_FORMAT} {value!r}: use one of {', '.join(LOG_FORMATS)}")


def configure_logging(log_format: LogFormat, level: int, stream: TextIO | None = None) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
