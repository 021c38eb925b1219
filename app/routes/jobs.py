"""`/v1/jobs`: submit, read, download, cancel, stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api_schemas.api import MAX_RESULTS, ErrorEnvelope, Job
from api_schemas.records import JobRecord
from app.dependencies import BaseUrl, Owner, Service, SubmissionBody
from app.errors import ERROR_RESPONSES
from app.headers import IdempotencyKey, LastEventId, PreferWait
from app.openapi import SUBMIT_BODY
from app.service import JobService

jobs_router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_response(
    service: JobService,
    record: JobRecord,
    base_url: str,
    status_code: int,
    headers: dict[str, str] | None = None,
) -> Response:
    job = service.render(record, base_url)
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
        429: {
            "model": ErrorEnvelope,
            "description": "A quota: this key's submission rate or active jobs, or the queue's cap. "
            "`Retry-After` says when to try again; `RateLimit-Policy` and `RateLimit` which limit it was.",
        },
    },
    openapi_extra=SUBMIT_BODY,
)
async def create_job(
    service: Service,
    owner: Owner,
    submission: SubmissionBody,
    prefer_wait: PreferWait,
    key: IdempotencyKey,
    base_url: BaseUrl,
) -> Response:
    """Queue an edit or a generation. Image 1 is the image to edit; the others are references. (Also a
    Feature Mixing pair, and the text tasks: `judge`, whose images are a case's inputs and then the
    output to score, last; `mixing_prompts`, an `attribute` and a `count`. Their result is the job's
    JSON `output`.)

    `task` left out: `edit` with at least one image, else `generate`. Everything is checked before the
    job is queued; the answer is the job object (202) with links to itself and its result.
    """
    record, replayed = await run_in_threadpool(service.submit, owner, submission, key)
    headers = {"Location": f"/v1/jobs/{record.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if prefer_wait is not None:
        wait_s = min(prefer_wait, service.settings.max_wait_s)
        record = await run_in_threadpool(service.wait, record, wait_s)
        headers["Preference-Applied"] = f"wait={wait_s}"
        if record.status.is_terminal():
            return await run_in_threadpool(job_response, service, record, base_url, 200, headers)
    return await run_in_threadpool(job_response, service, record, base_url, 202, headers)


@jobs_router.get(
    "/{job_id}", operation_id="get_job", summary="Get a job", response_model=Job, responses=ERROR_RESPONSES
)
def get_job(job_id: str, service: Service, owner: Owner, base_url: BaseUrl) -> Response:
    """The job object: status, progress, queue position, timings, error or result (with its signed
    links, `result.signed_url`, which download without a key)."""
    return job_response(service, service.get(owner, job_id), base_url, 200)


@jobs_router.get(
    "/{job_id}/result",
    operation_id="get_job_result",
    summary="Download the result image",
    response_class=Response,  # the 200 is an image: no `application/json` beside it in OpenAPI
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image."},
        **ERROR_RESPONSES,
    },
)
def get_job_result(
    job_id: str,
    service: Service,
    owner: Owner,
    index: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_RESULTS - 1,
            description="Which image: 0 (the default) is the job's first image; a job with num_images=n "
            "has 0..n-1 (image i sampled with seed + i); a Feature Mixing job has two, 0 the source and 1 "
            "the target.",
        ),
    ] = 0,
) -> Response:
    """The image bytes; 409 while the job is not finished (or did not succeed), 404 once it expired. A
    text job (`judge`, `mixing_prompts`) has no image (404 `result_index`): its result is the job
    object's `output`."""
    data, content_type = service.result(owner, job_id, index)
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
def cancel_job(job_id: str, service: Service, owner: Owner, base_url: BaseUrl) -> Response:
    """A queued job ends `canceled` at once and never runs (200); a running job stops at its next
    denoising step (202, then `canceled`); a finished job answers 409."""
    record, accepted = service.cancel(owner, job_id)
    return job_response(service, record, base_url, 202 if accepted else 200)


@jobs_router.get(
    "/{job_id}/events",
    operation_id="job_events",
    summary="Stream a job's events (SSE)",
    response_class=Response,  # the 200 is `text/event-stream` only
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`queued` (data: position), `started`, `progress` (stage, step, total; every "
            "DREAMOMNI2_PREVIEW_EVERY-th denoising step also `preview`, a small JPEG data URI of the image "
            "as it forms), then one final `succeeded`, `failed` or `canceled` whose data is the job object. "
            "Every event has an id; reconnect with `Last-Event-ID` to resume.",
        },
        204: {"description": "Reconnected with the id of the final event (or later): the stream is over."},
        **ERROR_RESPONSES,
    },
)
async def job_events_stream(
    request: Request, job_id: str, service: Service, owner: Owner, last_event_id: LastEventId
) -> Response:
    stream = await service.events(request, owner, job_id, last_event_id)
    if stream is None:
        return Response(status_code=204)
    return EventSourceResponse(
        stream, ping=15, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
