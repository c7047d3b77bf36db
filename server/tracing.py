"""OpenTelemetry tracing, off by default: the server's own tracer provider and the spans of a request.

A running server owns one `Tracing`: it holds the TracerProvider built from `[tracing]` and
nothing is set globally, so several servers (tests) keep their spans apart. Off, it holds no
provider and every hook returns at once: no span objects, no context switches, no exporter thread.

Spans are children of a request's span only (the gRPC server span the interceptor opens, or the
HTTP one of `TracingMiddleware`): indexing the catalogue at start or a re-embed in the background
records nothing. Queue and inference times come from the batcher's own measurements, so the
batcher knows nothing of tracing.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .config import TraceExporter, TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

INSTRUMENTATION_NAME = "openemploi"
NO_SPAN: AbstractContextManager[None] = nullcontext()  # reusable: the off path allocates nothing
AttributeValue = str | int | float | bool


class Tracing:
    """The tracer of one server, or none: `span` and `stage` are what the request path calls."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME) if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: AttributeValue) -> AbstractContextManager[object]:
        """A child span of the current request's span around a block; nothing outside a recorded request."""
        if self._tracer is None or not trace.get_current_span().is_recording():
            return NO_SPAN
        return self._tracer.start_as_current_span(name, attributes=attributes)

    def stage(self, name: str, start_ns: int, end_ns: int, **attributes: AttributeValue) -> None:
        """A finished child of the current span, from times measured elsewhere (wall clock, nanoseconds)."""
        if self._tracer is None or not trace.get_current_span().is_recording():
            return
        span = self._tracer.start_span(name, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))

    def batch_stages(self, submitted_ns: int, queue_s: float, inference_s: float, batches: int) -> None:
        """`queue` from submission until the request's last batch started, then `inference`.

        The batcher measures the longest wait and the summed backend time of the request's batches:
        when its texts were spread over several batches, the spans show those totals back to back.
        """
        if self._tracer is None:
            return
        queued_ns = submitted_ns + int(queue_s * 1e9)
        self.stage("queue", submitted_ns, queued_ns, batches=batches)
        self.stage("inference", queued_ns, queued_ns + int(inference_s * 1e9), batches=batches)

    @contextmanager
    def http_span(self, method: str, path: str, headers: Mapping[str, str]) -> Iterator[trace.Span]:
        """A SERVER span for one HTTP request, child of the caller's `traceparent` header when it sent one.

        `headers` with lower-case names. Off, it yields the invalid span (its setters do nothing).
        """
        if self._tracer is None:
            yield trace.INVALID_SPAN
            return
        attributes: dict[str, AttributeValue] = {"http.request.method": method, "url.path": path}
        with self._tracer.start_as_current_span(
            f"{method} {path}", context=propagate.extract(headers), kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            yield span

    def shutdown(self) -> None:
        """Export what is buffered, stop the exporter thread (blocking: call it off the event loop)."""
        if self.provider is not None:
            self.provider.shutdown()


DISABLED = Tracing()


def start_tracing(config: TracingConfig, exporter: SpanExporter | None = None) -> Tracing:
    """The provider `config` asks for; `exporter` replaces the configured one (tests read spans in memory)."""
    if not config.enabled:
        return DISABLED
    # The SDK and exporters load only when tracing is on.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(config)))
    return Tracing(provider)


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == TraceExporter.CONSOLE:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint, insecure=config.endpoint.startswith("http://"))


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in W3C hex form, for log lines; None outside a trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TracingMiddleware:
    """ASGI middleware: one SERVER span per HTTP request, continuing the caller's W3C `traceparent`.

    `TracingMiddleware(app, tracing)` or Starlette's `app.add_middleware(TracingMiddleware,
    tracing=tracing)`; with tracing off it passes requests straight through.
    """

    def __init__(self, app: AsgiApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tracing.enabled:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", ())}
        with self.tracing.http_span(str(scope.get("method", "GET")), str(scope.get("path", "/")), headers) as span:

            async def send_traced(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_traced)
