"""OpenTelemetry traces: a SERVER span per request, a CLIENT `chat {model}` span upstream.

The provider is owned by this object (never the global one). With no exporter configured the
sampler records nothing, but spans still carry real ids: every response gets a trace id and
the upstream gets a `traceparent` either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.settings import Telemetry


class Tracing:
    """Starts spans and carries trace context in and out of the gateway."""

    def __init__(
        self,
        provider: TracerProvider,
        capture_content: bool = False,
        processor: SpanProcessor | None = None,
    ) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("gateway")
        self.capture_content = capture_content
        self.propagator = TraceContextTextMapPropagator()
        self._processor = processor

    @classmethod
    def from_settings(cls, tel: Telemetry, exporter: SpanExporter | None = None) -> Tracing:
        resource = Resource.create({"service.name": tel.service_name})
        endpoint = tel.traces.endpoint
        if exporter is None and endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = (
                endpoint
                if endpoint.rstrip("/").endswith("/v1/traces")
                else endpoint.rstrip("/") + "/v1/traces"
            )
            exporter = OTLPSpanExporter(endpoint=url, timeout=5)
        if exporter is None:
            return cls(TracerProvider(resource=resource, sampler=ALWAYS_OFF))
        provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(tel.traces.sample_ratio))
        )
        # a batch processor: export happens on its own thread, a dead collector costs nothing
        processor = BatchSpanProcessor(exporter, max_queue_size=8192, schedule_delay_millis=1000)
        provider.add_span_processor(processor)
        return cls(provider, tel.traces.capture_content, processor)

    def server_span(self, name: str, headers: Mapping[str, str]) -> Span:
        parent = self.propagator.extract(headers) if "traceparent" in headers else None
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)

    def client_span(self, parent: Span, name: str, attributes: Mapping[str, Any]) -> Span:
        ctx = trace.set_span_in_context(parent, otel_context.Context())
        return self.tracer.start_span(
            name, context=ctx, kind=SpanKind.CLIENT, attributes=attributes
        )

    def inject(self, span: Span, carrier: MutableMapping[str, str]) -> None:
        self.propagator.inject(
            carrier, context=trace.set_span_in_context(span, otel_context.Context())
        )

    def content_attributes(
        self, body: Mapping[str, Any], secrets: tuple[bytes, ...]
    ) -> dict[str, str]:
        """Opt-in message content, as GenAI JSON attributes, with secrets redacted."""
        out: dict[str, str] = {}
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            out["gen_ai.system_instructions"] = redact(
                orjson.dumps([{"type": "text", "content": instructions}]).decode(), secrets
            )
        messages = input_messages(body)
        if messages:
            out["gen_ai.input.messages"] = redact(orjson.dumps(messages).decode(), secrets)
        return out

    def flush(self) -> None:
        if self._processor is not None:
            self._processor.force_flush(5000)

    def shutdown(self) -> None:
        self.provider.shutdown()


def trace_id_hex(span: Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,})")


def redact(text: str, secrets: tuple[bytes, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s.decode(), "[REDACTED]")
    return _KEYLIKE.sub("[REDACTED]", text)


def input_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Responses or Chat input -> GenAI `{"role", "parts": [{"type": "text", ...}]}` messages."""
    raw = body.get("input", body.get("messages"))
    if isinstance(raw, str):
        return [{"role": "user", "parts": [{"type": "text", "content": raw}]}]
    out: list[dict[str, Any]] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, Mapping):
            continue
        content = item.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "content": content})
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "content": part["text"]})
        out.append({"role": str(item.get("role", "user")), "parts": parts})
    return out
