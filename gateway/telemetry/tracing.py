"""OpenTelemetry traces: a SERVER span per request, a CLIENT `chat {model}` span upstream.

The provider is owned by this object (never the global one). With no exporter configured the
sampler records nothing, but spans still carry real ids: every response gets a trace id and
the upstream gets a `traceparent` either way.

A slow or silent collector costs bounded memory and a bounded wait at exit: at most
`QUEUE_SPANS` spans wait (more are dropped, ending a span never blocks), attribute values are
cut at `ATTRIBUTE_CHARS`, and shutdown flushes for at most `SHUTDOWN_SECONDS`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.redact import Redactor
from gateway.settings import Telemetry

# Worst case held while the collector does not answer: QUEUE_SPANS spans of a few KB each, or
# about 20 KB for a client span with captured content cut at ATTRIBUTE_CHARS: a few MB.
QUEUE_SPANS = 512
EXPORT_BATCH = 128
ATTRIBUTE_CHARS = 8 * 1024
# The final flush's share of a stop: well inside any orchestrator's grace period.
SHUTDOWN_SECONDS = 3.0


class Tracing:
    """Starts spans and carries trace context in and out of the gateway."""

    def __init__(
        self,
        provider: TracerProvider,
        capture_content: bool = False,
        exporter: CuttableExporter | None = None,
    ) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("gateway")
        self.capture_content = capture_content
        self.propagator = TraceContextTextMapPropagator()
        # nothing is exported: spans only carry ids, made without the SDK's sampling machinery
        self._ids_only = exporter is None and isinstance(provider.sampler, type(ALWAYS_OFF))
        self._ids = provider.id_generator
        self._exporter = exporter

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
        # not the SDK's atexit hook: it would wait up to 30 s on a silent collector; the
        # Gateway's close calls our bounded `shutdown` instead
        if exporter is None:
            return cls(
                TracerProvider(resource=resource, sampler=ALWAYS_OFF, shutdown_on_exit=False)
            )
        provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(tel.traces.sample_ratio)),
            shutdown_on_exit=False,
            span_limits=SpanLimits(max_span_attribute_length=ATTRIBUTE_CHARS),
        )
        cuttable = CuttableExporter(exporter)
        # a batch processor: export happens on its own thread and a full queue drops spans,
        # so a dead collector never slows a request
        provider.add_span_processor(
            BatchSpanProcessor(
                cuttable,
                max_queue_size=QUEUE_SPANS,
                max_export_batch_size=EXPORT_BATCH,
                schedule_delay_millis=1000,
            )
        )
        return cls(provider, tel.traces.capture_content, cuttable)

    def server_span(self, name: str, headers: Mapping[str, str]) -> Span:
        parent = self.propagator.extract(headers) if "traceparent" in headers else None
        if self._ids_only:
            remote = trace.get_current_span(parent).get_span_context() if parent else None
            trace_id = remote.trace_id if remote and remote.is_valid else self._trace_id()
            state = remote.trace_state if remote and remote.is_valid else None
            return NonRecordingSpan(
                SpanContext(trace_id, self._span_id(), is_remote=False, trace_state=state)
            )
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)

    def client_span(self, parent: Span, name: str, attributes: Mapping[str, Any]) -> Span:
        if self._ids_only:
            up = parent.get_span_context()
            return NonRecordingSpan(
                SpanContext(
                    up.trace_id, self._span_id(), is_remote=False, trace_state=up.trace_state
                )
            )
        ctx = trace.set_span_in_context(parent, otel_context.Context())
        return self.tracer.start_span(
            name, context=ctx, kind=SpanKind.CLIENT, attributes=attributes
        )

    def inject(self, span: Span, carrier: MutableMapping[str, str]) -> None:
        ctx = span.get_span_context()
        if self._ids_only and not ctx.trace_state:
            # what the propagator writes for an unsampled span, without building a context
            carrier["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-00"
            return
        self.propagator.inject(
            carrier, context=trace.set_span_in_context(span, otel_context.Context())
        )

    def _trace_id(self) -> int:
        found = self._ids.generate_trace_id()
        while found == INVALID_TRACE_ID:
            found = self._ids.generate_trace_id()
        return found

    def _span_id(self) -> int:
        found = self._ids.generate_span_id()
        while found == INVALID_SPAN_ID:
            found = self._ids.generate_span_id()
        return found

    def content_attributes(self, body: Mapping[str, Any], redact: Redactor) -> dict[str, str]:
        """Opt-in message content, as GenAI JSON attributes, with keys redacted by `redact`:
        the request's policy's redactor, the one captures use too."""
        out: dict[str, str] = {}
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            out["gen_ai.system_instructions"] = redact(
                orjson.dumps([{"type": "text", "content": instructions}]).decode()
            )
        messages = input_messages(body)
        if messages:
            out["gen_ai.input.messages"] = redact(orjson.dumps(messages).decode())
        return out

    def flush(self, deadline: float = 5.0) -> None:
        """Export what is queued, waiting at most `deadline` seconds."""
        if self._exporter is not None:
            _bounded(self.provider.force_flush, deadline)

    def shutdown(self, deadline: float = SHUTDOWN_SECONDS) -> None:
        """Flush for at most `deadline` seconds, then stop exporting for good.

        The SDK's shutdown waits up to 30 s for an export stuck on a silent collector, and
        this runs in an executor thread that interpreter exit joins: so the SDK's shutdown
        runs on a daemon thread, and past the deadline the exporter is cut off. A send still
        blocked on its socket then ends with the process.
        """
        _bounded(self.provider.shutdown, deadline)
        if self._exporter is not None:
            self._exporter.cut()


class CuttableExporter(SpanExporter):
    """Wraps the real exporter with a switch that ends exporting at once and for good."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self._cut = threading.Event()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._cut.is_set():  # batches still queued after the deadline are dropped
            return SpanExportResult.FAILURE
        return self._inner.export(spans)

    def cut(self) -> None:
        with self._lock:
            if self._cut.is_set():
                return
            self._cut.set()
        # the OTLP exporter's shutdown wakes its retry back-off and closes its session
        self._inner.shutdown()

    def shutdown(self) -> None:
        self.cut()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _bounded(work: Callable[[], object], seconds: float) -> None:
    """Run blocking SDK work on a daemon thread and wait for it at most `seconds`."""
    thread = threading.Thread(target=work, name="gateway-tracing", daemon=True)
    thread.start()
    thread.join(seconds)


def trace_id_hex(span: Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


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
