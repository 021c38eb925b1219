"""Thin routes: parse the HTTP request, call the service, shape the HTTP answer."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from api_schemas.api import ErrorEnvelope, Job, JobOptions, JobRequestJSON, Readiness, WorkerCounts
from api_schemas.errors import InvalidInput, UnsupportedMediaType
from app.errors import ERROR_RESPONSES
from app.events import job_events
from app.service import JobService, Submission, decode_data_uri

jobs_router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
health_router = APIRouter(tags=["operations"])

_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
_EVENT_ID = re.compile(r"\d{1,20}(-\d{1,20})?", re.ASCII)


def get_service(request: Request) -> JobService:
    return request.app.state.jobs


def get_owner(request: Request) -> str:
    return request.app.state.keys.owner(request)


Service = Annotated[JobService, Depends(get_service)]
Owner = Annotated[str, Depends(get_owner)]

_FORM_FIELDS = {
    name: {"type": "string", "description": field.description or ""}
    for name, field in JobOptions.model_fields.items()
}
_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instruction"],
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Repeat the field; the order is image 1..n. Image 1 is the one to edit.",
        },
        **_FORM_FIELDS,
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"},
        "webhook_events": {
            "type": "array",
            "items": {"type": "string", "enum": ["started", "progress", "completed"]},
            "description": "Repeat the field (or comma-separate): started, progress, completed.",
        },
    },
}
_SUBMIT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {
                "schema": {"$ref": "#/components/schemas/JobRequestJSON"},
                "example": JobRequestJSON.model_config["json_schema_extra"]["example"],
            },
        },
    },
    "parameters": [
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "example": "wait=30"},
            "description": "`wait=N`: hold the answer up to N seconds and return the finished job (200) "
            "if it finishes in time; otherwise the usual 202.",
        },
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 255},
            "description": "The same key and body return the same job (header `Idempotent-Replayed: true`); "
            "the same key with a different body answers 422.",
        },
        {
            "name": "Cancel-After",
            "in": "header",
            "required": False,
            "schema": {"type": "number", "example": 120},
            "description": "Like `deadline_s`: cancel the job unrun if no worker starts it within N seconds.",
        },
    ],
}


def _invalid(exc: ValidationError) -> InvalidInput:
    problems = [{"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"]} for e in exc.errors()]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return InvalidInput(
        f"The request is invalid: {summary}.", code="invalid_request", details={"errors": problems}
    )


def _too_many(count: int, limit: int) -> InvalidInput:
    return InvalidInput(
        f"{count} images were sent; at most {limit} are allowed (image 1 plus references).",
        code="too_many_images",
        details={"images": count, "max": limit},
    )


async def read_submission(request: Request, service: JobService) -> Submission:
    """The images and options of a multipart or JSON submission, checked by the same model."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limits = service.limits
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=4 * limits.max_images + 4, max_fields=64)
        except MultiPartException as exc:
            raise InvalidInput(
                f"The multipart body could not be read: {exc.message}", code="invalid_request"
            ) from None
        images: list[bytes] = []
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name == "images":
                if not isinstance(value, UploadFile):
                    raise InvalidInput("`images` must be file uploads.", code="invalid_request")
                if len(images) >= limits.max_images:
                    raise _too_many(len(form.getlist("images")), limits.max_images)
                images.append(await value.read())
            elif isinstance(value, UploadFile):
                raise InvalidInput(
                    f"Unexpected file field {name!r}; images go in `images`.", code="invalid_request"
                )
            elif name == "webhook_events":
                fields.setdefault(name, []).extend(e.strip() for e in value.split(",") if e.strip())
            elif name in fields:
                raise InvalidInput(f"The field {name!r} was sent more than once.", code="invalid_request")
            elif value != "" or name == "instruction":
                # Empty form fields mean "not set", as browsers send them for blank inputs.
                fields[name] = value
        try:
            return Submission(images=images, options=JobOptions.model_validate(fields))
        except ValidationError as exc:
            raise _invalid(exc) from None
    if content_type == "application/json":
        try:
            body = JobRequestJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _invalid(exc) from None
        if len(body.images) > limits.max_images:
            raise _too_many(len(body.images), limits.max_images)
        max_bytes = limits.image_limits().max_bytes
        images = [decode_data_uri(uri, f"image {n}", max_bytes) for n, uri in enumerate(body.images, start=1)]
        options = JobOptions.model_validate(body.model_dump(exclude={"images"}, exclude_unset=True))
        return Submission(images=images, options=options)
    raise UnsupportedMediaType(
        "Send the job as multipart/form-data (files in `images`) or as application/json."
    )


def _cancel_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InvalidInput(
            f"Cancel-After must be a positive number of seconds; got {value!r}.", code="invalid_request"
        )
    return seconds


def job_response(
    service: JobService, record, status_code: int, headers: dict[str, str] | None = None
) -> Response:
    job = service.render(record)
    return JSONResponse(job.model_dump(mode="json", by_alias=True), status_code=status_code, headers=headers)


@jobs_router.post(
    "",
    operation_id="create_job",
    summary="Submit a job",
    status_code=202,
    response_model=Job,
    responses={
        200: {"model": Job, "description": "Finished within `Prefer: wait=N`."},
        **ERROR_RESPONSES,
        415: {"model": ErrorEnvelope, "description": "The body is neither multipart/form-data nor JSON."},
    },
    openapi_extra=_SUBMIT_DOC,
)
async def create_job(
    request: Request,
    service: Service,
    owner: Owner,
    prefer: Annotated[str | None, Header(include_in_schema=False)] = None,
    idempotency_key: Annotated[str | None, Header(include_in_schema=False, max_length=255)] = None,
    cancel_after: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Queue an edit or a generation. Image 1 is the image to edit; the others are references.

    `task` left out: `edit` with at least one image, else `generate`. Everything is checked before the
    job is queued; the answer is the job object (202) with links to itself and its result.
    """
    submission = await read_submission(request, service)
    submission.cancel_after_s = _cancel_after(cancel_after)
    record, replayed = await run_in_threadpool(service.submit, owner, submission, idempotency_key)
    location = {"Location": f"/v1/jobs/{record.id}"}
    if replayed:
        location["Idempotent-Replayed"] = "true"
    match = _PREFER_WAIT.search(prefer or "")
    if match:
        wait_s = min(int(match.group(1)), service.settings.max_wait_s)
        record = await run_in_threadpool(service.wait, record, wait_s)
        location["Preference-Applied"] = f"wait={wait_s}"
        if record.status.is_terminal():
            return await run_in_threadpool(job_response, service, record, 200, location)
    return await run_in_threadpool(job_response, service, record, 202, location)


@jobs_router.get(
    "/{job_id}", operation_id="get_job", summary="Get a job", response_model=Job, responses=ERROR_RESPONSES
)
def get_job(job_id: str, service: Service, owner: Owner) -> Response:
    """The job object: status, progress, queue position, timings, error or result."""
    return job_response(service, service.get(owner, job_id), 200)


@jobs_router.get(
    "/{job_id}/result",
    operation_id="get_job_result",
    summary="Download the result image",
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image."},
        **ERROR_RESPONSES,
    },
)
def get_job_result(job_id: str, service: Service, owner: Owner) -> Response:
    """The image bytes; 409 while the job is not finished (or did not succeed), 404 once it expired."""
    data, content_type = service.result(owner, job_id)
    return Response(content=data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})


@jobs_router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    summary="Cancel a job",
    response_model=Job,
    responses={
        202: {"model": Job, "description": "Running: it stops at its next denoising step."},
        **ERROR_RESPONSES,
    },
)
def cancel_job(job_id: str, service: Service, owner: Owner) -> Response:
    """A queued job ends `canceled` at once and never runs (200); a running job stops at its next
    denoising step (202, then `canceled`); a finished job answers 409."""
    record, accepted = service.cancel(owner, job_id)
    return job_response(service, record, 202 if accepted else 200)


@jobs_router.get(
    "/{job_id}/events",
    operation_id="job_events",
    summary="Stream a job's events (SSE)",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`queued` (data: position), `started`, `progress` (stage, step, total), then one "
            "final `succeeded`, `failed` or `canceled` whose data is the job object. Every event has an id; "
            "reconnect with `Last-Event-ID` to resume.",
        },
        **ERROR_RESPONSES,
    },
)
async def job_events_stream(
    request: Request,
    job_id: str,
    service: Service,
    owner: Owner,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> EventSourceResponse:
    await run_in_threadpool(service.get, owner, job_id)  # 404 before the stream starts
    if last_event_id and not _EVENT_ID.fullmatch(last_event_id):
        # Redis would refuse it mid-stream, after the 200 is sent: refuse it while an answer can say why.
        raise InvalidInput(
            f"Last-Event-ID {last_event_id!r} is not an id this stream sent (like `1700000000000-0`).",
            code="invalid_request",
        )

    def render(job: str) -> dict:
        return service.render(service.store.get(job)).model_dump(mode="json", by_alias=True)

    stream = job_events(request, request.app.state.aredis, service.store, job_id, last_event_id, render)
    return EventSourceResponse(
        stream, ping=15, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


@health_router.get("/healthz", operation_id="healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """200 while the process serves requests; depends on nothing else."""
    return {"status": "ok"}


@health_router.get(
    "/readyz",
    operation_id="readyz",
    summary="Readiness",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis is unreachable."}},
)
def readyz(request: Request) -> Response:
    """200 when this gateway can take jobs (Redis reachable). Workers may scale to zero, so they do not
    count; the body says how many are up and how many have their models loaded."""
    store = request.app.state.jobs.store
    try:
        store.redis.ping()
        workers = list(store.workers())
        modes: dict[str, int] = {}
        for worker in workers:
            mode = (worker.get("memory") or {}).get("mode") if worker.get("ready") else None
            if mode:
                modes[mode] = modes.get(mode, 0) + 1
        body = Readiness(
            status="ready",
            redis="ok",
            workers=WorkerCounts(
                up=len(workers), ready=sum(1 for w in workers if w.get("ready")), memory_modes=modes
            ),
            queue_depth=store.queue_depth(),
        )
        return JSONResponse(body.model_dump(mode="json"))
    except Exception as exc:
        body = Readiness(status="unavailable", redis=f"{type(exc).__name__}: {exc}")
        return JSONResponse(body.model_dump(mode="json"), status_code=503)


@health_router.get(
    "/metrics", operation_id="metrics", summary="Prometheus metrics", response_class=PlainTextResponse
)
def metrics(request: Request) -> Response:
    """Prometheus text format: requests, latency, submissions, queue depth, workers."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
