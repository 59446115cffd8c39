"""OpenTelemetry: the publisher's trace context travels inside the signal it publishes.

When :meth:`Bus.publish` is called without ``trace=`` while an OpenTelemetry span is current,
the span's W3C trace context (``traceparent``, ``tracestate``, baggage: whatever the global
propagator writes) is stored in the signal's ``trace`` field. The trace projector
(``consumers/traces.py``) reads it back and hangs the signal's delivery spans under that span.

The library only *reads* the current context: it never configures a tracer provider or a
propagator. Without a span (or without any OpenTelemetry setup) this costs one context-variable
lookup per publish.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context


def current_carrier() -> dict[str, str]:
    """The W3C carrier of the current span, or ``{}`` when no valid span is current."""
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    # Imported here: loading the propagators scans entry points, a cost only tracing users pay.
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str]) -> Context:
    """The context a carrier describes, built on an empty context (never the current one)."""
    if not carrier:
        return Context()
    from opentelemetry import propagate

    return propagate.extract(carrier, context=Context())


def trace_id_of(carrier: Mapping[str, str]) -> str:
    """The trace id (32 hex digits) of a carrier, or ``""`` when it holds no valid context."""
    if not carrier:
        return ""
    span_context = trace.get_current_span(context_from(carrier)).get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


def current_trace_id() -> str:
    """The trace id of the current span, or ``""`` when no valid span is current."""
    span_context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""
