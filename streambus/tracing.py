"""OpenTelemetry: the publisher's trace context travels inside the signal it publishes.

When :meth:`Bus.publish` is called without ``trace=`` while an OpenTelemetry span is current,
the span's W3C trace context (``traceparent``, ``tracestate``, baggage: whatever the global
propagator writes) is stored in the signal's ``trace`` field. The trace projector
(``consumers/traces.py``) reads it back and hangs the signal's delivery spans under that span.

The library only *reads* the current context: it never configures a tracer provider or a
propagator. Nor does it import OpenTelemetry for that: a span can only be current in a process
that imported ``opentelemetry.trace``, so until something else did, there is none to read, and
the import (tens of ms, a third of a one-shot ``streambus signal``) is never paid. With
OpenTelemetry loaded and no span current this costs one context-variable lookup per publish.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from opentelemetry.context import Context

_API: Final = "opentelemetry.trace"
_TRACEPARENT: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
"""W3C trace context, as OpenTelemetry's ``TraceContextTextMapPropagator`` reads it."""


def _in_use() -> bool:
    """Whether anything in this process imported the OpenTelemetry tracing API."""
    return _API in sys.modules


def current_carrier() -> dict[str, str]:
    """The W3C carrier of the current span, or ``{}`` when no valid span is current."""
    if not _in_use():
        return {}
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    # Imported here: loading the propagators scans entry points, a cost only tracing users pay.
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str]) -> Context:
    """The context a carrier describes, built on an empty context (never the current one)."""
    from opentelemetry import propagate
    from opentelemetry.context import Context

    if not carrier:
        return Context()
    return propagate.extract(carrier, context=Context())


def trace_id_of(carrier: Mapping[str, str]) -> str:
    """The trace id (32 hex digits) of a carrier, or ``""`` when it holds no valid context.

    A W3C ``traceparent`` (what the default propagator writes) is read as it is, without
    loading OpenTelemetry; any other carrier is read by the global propagator.
    """
    if not carrier:
        return ""
    if (parent := carrier.get("traceparent")) is not None:
        match = _TRACEPARENT.fullmatch(parent.strip())
        if (match is None or match[1] == "ff" or (match[1] == "00" and match[4])
                or not match[2].strip("0") or not match[3].strip("0")):
            return ""
        return match[2]
    from opentelemetry import trace

    span_context = trace.get_current_span(context_from(carrier)).get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


def current_trace_id() -> str:
    """The trace id of the current span, or ``""`` when no valid span is current."""
    if not _in_use():
        return ""
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""
