"""OpenTelemetry traces of a job, off unless an OTLP exporter endpoint is set.

OpenTelemetry's own variables configure it: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on, `OTEL_SDK_DISABLED=true` keeps it off, and
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_BSP_*` ... work as everywhere. Spans go out over OTLP/HTTP (protobuf).

One trace per job: the gateway's span of the submit request is its root; its W3C `traceparent` is
stored with the job, and the worker's run of the job (with a span per stage: translate, encode,
denoise, decode, upload) and every webhook attempt continue it from there, whichever process and
however much later they run. Off, this module imports nothing of OpenTelemetry and every helper
costs a check of one global.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_schemas.records import JobRecord

#: What a span attribute may be here (OpenTelemetry's types; None is left out).
AttributeValue = str | bool | int | float | None

#: The stages of `models.stages` that the job's trace names otherwise: both encodings are `encode`,
#: as in the job's timings.
_STAGE_SPANS = {"encode_prompt": "encode", "encode_images": "encode"}

_tracer: Any = None  # an opentelemetry Tracer once `configure_tracing` turned tracing on


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint is set and the SDK is not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def configure_tracing(service_name: str) -> bool:
    """Start exporting this process's spans if the environment asks for it (`requested`); returns
    whether tracing is on. `service_name` names the process unless OTEL_SERVICE_NAME (or
    OTEL_RESOURCE_ATTRIBUTES) does. Once per process: a second call changes nothing."""
    global _tracer
    if _tracer is not None:
        return True
    if not requested():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)  # flushed at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("dreamomni2")
    return True


def enabled() -> bool:
    return _tracer is not None


def _attributes(values: Mapping[str, AttributeValue] | None) -> dict[str, str | bool | int | float]:
    return {key: value for key, value in (values or {}).items() if value is not None}


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: str = "internal",
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[None]:
    """Run the block in a span `name` (a no-op when tracing is off). `parent` is a W3C traceparent
    (a job's): the span continues that trace rather than the current one. `kind`: OpenTelemetry's
    span kinds in lower case (`consumer`, `client`, ...). An exception out of the block marks it failed."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    context = _context_of(parent) if parent else None
    with _tracer.start_as_current_span(
        name, context=context, kind=SpanKind[kind.upper()], attributes=_attributes(attributes)
    ):
        yield


def annotate(attributes: Mapping[str, AttributeValue], *, error: str | None = None) -> None:
    """Add `attributes` to the current span and, with `error`, mark it failed with that description;
    nothing when tracing is off."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = trace.get_current_span()
    current.set_attributes(_attributes(attributes))
    if error is not None:
        current.set_status(Status(StatusCode.ERROR, error))


def job_attributes(record: JobRecord) -> dict[str, AttributeValue]:
    """What a span of the job says about it (the gateway's submit span, the worker's run)."""
    job = record.spec.job
    return {
        "dreamomni2.job.id": record.id,
        "dreamomni2.task": job.task.value,
        "dreamomni2.adapter": job.adapter.value,
        "dreamomni2.image_count": job.image_count,
        "dreamomni2.steps": job.steps,
        "dreamomni2.step_cache": job.step_cache.value,
    }


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span, to store with a job; None when tracing is off or
    no span is current."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits) for log lines; None when tracing is off or no span is
    current."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _context_of(traceparent: str) -> Any:  # noqa: ANN401 (an opentelemetry Context)
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


class StageSpans:
    """An observer of `models.stages`: a span for each stage of the job running in this thread, child
    of the span current when the stage starts (the job's). Register it with `models.stages.observing`
    around the engine's run, only while tracing is on (`stage_spans`)."""

    def __init__(self, attributes: Mapping[str, AttributeValue] | None = None):
        self.attributes = _attributes(attributes)
        self._open: list[tuple[Any, object]] = []

    def stage_started(self, stage: object) -> None:
        from opentelemetry import context, trace

        which = str(getattr(stage, "value", stage))
        started = _tracer.start_span(
            _STAGE_SPANS.get(which, which), attributes={**self.attributes, "dreamomni2.stage": which}
        )
        self._open.append((started, context.attach(trace.set_span_in_context(started))))

    def stage_ended(self, stage: object) -> None:
        from opentelemetry import context

        if not self._open:
            return
        ended, token = self._open.pop()
        context.detach(token)
        ended.end()


def stage_spans(attributes: Mapping[str, AttributeValue] | None = None) -> StageSpans | None:
    """A `StageSpans` observer while tracing is on; None when off (nothing to register)."""
    return StageSpans(attributes) if _tracer is not None else None
