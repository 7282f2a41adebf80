"""With no trace exporter, spans only carry ids: made without the SDK's sampling machinery,
they must still continue an incoming trace and hand the upstream the `traceparent` the SDK's
propagator would have written."""

from __future__ import annotations

import re

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.settings import Telemetry
from gateway.telemetry.tracing import Tracing, trace_id_hex

INCOMING = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _sdk_inject(span: trace.Span) -> dict[str, str]:
    out: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(
        out, context=trace.set_span_in_context(span, otel_context.Context())
    )
    return out


def test_an_incoming_trace_is_continued_without_sampling() -> None:
    tracing = Tracing.from_settings(Telemetry())
    server = tracing.server_span("POST /v1/responses", {"traceparent": INCOMING})
    assert trace_id_hex(server) == "0af7651916cd43dd8448eb211c80319c"
    assert not server.is_recording()
    client = tracing.client_span(server, "chat m", {"gen_ai.request.model": "m"})
    assert client.get_span_context().trace_id == server.get_span_context().trace_id
    assert client.get_span_context().span_id != server.get_span_context().span_id
    carrier: dict[str, str] = {}
    tracing.inject(client, carrier)
    assert carrier == _sdk_inject(client)
    assert re.fullmatch(
        r"00-0af7651916cd43dd8448eb211c80319c-[0-9a-f]{16}-00", carrier["traceparent"]
    )


def test_a_new_trace_gets_fresh_ids_and_tracestate_travels() -> None:
    tracing = Tracing.from_settings(Telemetry())
    a, b = tracing.server_span("x", {}), tracing.server_span("x", {})
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id_hex(a)) and trace_id_hex(a) != "0" * 32
    assert trace_id_hex(a) != trace_id_hex(b)
    server = tracing.server_span("x", {"traceparent": INCOMING, "tracestate": "vendor=abc"})
    client = tracing.client_span(server, "chat m", {})
    carrier: dict[str, str] = {}
    tracing.inject(client, carrier)
    assert carrier == _sdk_inject(client) and carrier["tracestate"] == "vendor=abc"
    # a malformed traceparent starts a new trace rather than failing
    broken = tracing.server_span("x", {"traceparent": "00-zz-yy-01"})
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id_hex(broken))
