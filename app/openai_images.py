"""The OpenAI-compatible image calls as jobs: parse an OpenAI request into the native submission, hold
the job until it ends (at most DREAMOMNI2_MAX_WAIT_S) and answer in OpenAI's shapes; every refusal as
OpenAI's error envelope. A client that goes away cancels its job, so an SDK's retry never runs the same
request twice."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio
import redis
from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import Response

from api_schemas.api import ErrorInfo, JobOptions, JobStatus
from api_schemas.common import Task
from api_schemas.errors import ERROR_CODES, ErrorCode, ServiceError
from api_schemas.openai import (
    MODEL_ID,
    ImageData,
    ImageRequest,
    ImagesResponse,
    OpenAICode,
)
from api_schemas.records import JobRecord
from app.errors import RETRY_AFTER_S
from app.events import TERMINAL, job_events
from app.service import JobService, Submission

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
#: How often a held request checks whether its client is still there.
POLL_S = 0.5
#: Native field names as the OpenAI request calls them (a refusal names the caller's field).
_PARAMS = {"instruction": "prompt", "width": "size", "height": "size", "num_images": "n"}


class OpenAIRefusal(Exception):
    """A refusal in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param(exc: ServiceError) -> str | None:
    details = exc.details or {}
    field = details.get("field") or (details.get("errors") or [{}])[0].get("field")
    if details.get("image") or exc.code in (ErrorCode.INVALID_IMAGE, ErrorCode.TOO_MANY_IMAGES):
        return "image"
    if field is None and exc.code is ErrorCode.EMPTY_INSTRUCTION:
        return "prompt"
    return _PARAMS.get(field, field) if field else None


def refusal_of(exc: ServiceError) -> OpenAIRefusal:
    """A native error as OpenAI reports the same kind."""
    status, code = exc.http_status, exc.code.value
    headers = getattr(exc, "headers", None)
    if status == 401:
        return OpenAIRefusal(
            401, exc.message, code=OpenAICode.INVALID_API_KEY, headers={"WWW-Authenticate": "Bearer"}
        )
    if status == 429:
        return OpenAIRefusal(
            429, exc.message, type="rate_limit_error", code=OpenAICode.RATE_LIMIT_EXCEEDED, headers=headers
        )
    if status in (413, 415, 422):
        return OpenAIRefusal(400, exc.message, param=_param(exc), code=code)
    if status >= 500:
        retry = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return OpenAIRefusal(status, exc.message, type="server_error", code=code, headers=retry)
    return OpenAIRefusal(status, exc.message, code=code)


async def answer(work: Callable[[], Awaitable[Response]]) -> Response:
    """Run a route's body; every refusal in OpenAI's shape."""
    try:
        return await work()
    except OpenAIRefusal as refusal:
        return refusal.response()
    except ServiceError as exc:
        return refusal_of(exc).response()
    except redis.RedisError:
        message = f"The job store (Redis) is unreachable; try again in {RETRY_AFTER_S} s."
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return OpenAIRefusal(
            503, message, type="server_error", code=OpenAICode.UNAVAILABLE, headers=headers
        ).response()


def check_model(model: str | None) -> None:
    if model is not None and model != MODEL_ID:
        raise OpenAIRefusal(
            404,
            f"The model {model!r} does not exist; this service serves {MODEL_ID!r}.",
            param="model",
            code=OpenAICode.MODEL_NOT_FOUND,
        )


def _invalid(exc: ValidationError) -> OpenAIRefusal:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or None
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
    return OpenAIRefusal(400, f"Invalid request: {problems}.", param=field, code=OpenAICode.INVALID_VALUE)


def to_options(params: ImageRequest, task: Task) -> JobOptions:
    """The native job options of an OpenAI request; what the native API lacks is refused here."""
    check_model(params.model)
    if params.stream and params.response_format == "url":
        raise OpenAIRefusal(
            400,
            "response_format `url` cannot be streamed; use b64_json.",
            param="response_format",
            code=OpenAICode.INVALID_VALUE,
        )
    width = height = None
    if params.size not in (None, "auto"):
        match = _SIZE.match(params.size)
        if match is None:
            raise OpenAIRefusal(
                400,
                f"size must be `auto` or `WIDTHxHEIGHT` (e.g. 1024x768); got {params.size!r}.",
                param="size",
                code=OpenAICode.INVALID_VALUE,
            )
        if task is Task.EDIT:
            raise OpenAIRefusal(
                400,
                "size applies to generations only: an edit keeps the aspect ratio of image 1. "
                "Send `auto` or leave it out.",
                param="size",
                code=OpenAICode.INVALID_VALUE,
            )
        width, height = int(match[1]), int(match[2])
    options: dict[str, Any] = {"instruction": params.prompt, "task": task, "width": width, "height": height}
    if params.output_format is not None:
        options["output_format"] = params.output_format
    if params.loras is not None:
        options["loras"] = params.loras  # checked against DREAMOMNI2_LORAS by the native path
    if params.n is not None:
        options["num_images"] = params.n  # checked against DREAMOMNI2_MAX_NUM_IMAGES by the native path
    return JobOptions.model_validate(options)


async def read_generation(request: Request) -> tuple[ImageRequest, list[bytes]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise OpenAIRefusal(
            400, "Send the request as application/json.", code=OpenAICode.INVALID_CONTENT_TYPE
        )
    try:
        return ImageRequest.model_validate_json(await request.body()), []
    except ValidationError as exc:
        raise _invalid(exc) from None


async def read_edit(request: Request, service: JobService) -> tuple[ImageRequest, list[bytes]]:
    """`image` (one file) or `image[]` (repeated, image 1 first) and the form fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise OpenAIRefusal(
            400, "Send the edit as multipart/form-data.", code=OpenAICode.INVALID_CONTENT_TYPE
        )
    max_images = service.limits.max_images
    try:
        form = await request.form(max_files=max_images + 1, max_fields=32)
    except (MultiPartException, HTTPException) as exc:
        # Starlette's `Request.form` reports the parser's refusals as a 400 HTTPException.
        text = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
        too_many = text.startswith("Too many files")
        message = f"At most {max_images} images are allowed." if too_many else text
        raise OpenAIRefusal(
            400, message, param="image" if too_many else None, code=OpenAICode.INVALID_VALUE
        ) from None
    try:
        images: list[bytes] = []
        fields: dict[str, Any] = {}
        loras = LoraFormFields()
        for name, value in loras.take_all(form.multi_items()):
            if name in ("image", "image[]"):
                if not isinstance(value, UploadFile):
                    raise OpenAIRefusal(400, f"`{name}` must be a file upload.", param="image")
                images.append(await value.read())
            elif isinstance(value, UploadFile):
                raise OpenAIRefusal(
                    400, f"Unexpected file field {name!r}; images go in `image[]`.", param=name
                )
            elif name in fields:
                raise OpenAIRefusal(400, f"The field {name!r} was sent more than once.", param=name)
            elif value != "" or name == "prompt":
                fields[name] = value
        if not images:
            raise OpenAIRefusal(
                400, "An edit needs at least one image (`image` or `image[]`).", param="image"
            )
        if len(images) > max_images:
            raise OpenAIRefusal(
                400, f"{len(images)} images were sent; at most {max_images} are allowed.", param="image"
            )
        loras.merge_into(fields)
        try:
            return ImageRequest.model_validate(fields), images
        except ValidationError as exc:
            raise _invalid(exc) from None
    finally:
        await form.close()


_LORA_FIELD = re.compile(r"^loras\[(\d*)\]\[(\w+)\]$")


class LoraFormFields:
    """`loras` as form fields, the way the openai SDK sends `extra_body={"loras": [...]}` in a
    multipart request (`loras[][name]`, `loras[][scale]`, one object after the other) or indexed
    (`loras[0][name]`); `loras` as JSON text is an ordinary field. Without indices, an object starts
    at each `name` (and where a key repeats): write `name` first in each object, as the SDK keeps
    the order given."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._indexed: dict[int, dict[str, Any]] = {}

    def take_all(self, items: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Keep the LoRA fields of `items`; the others, in order."""
        return [(name, value) for name, value in items if not self.take(name, value)]

    def merge_into(self, fields: dict[str, Any]) -> None:
        """Put the LoRAs kept into `fields` as its `loras` (refused next to a JSON-text `loras`)."""
        if not self.items:
            return
        if "loras" in fields:
            raise OpenAIRefusal(
                400, "Send `loras` once: as JSON text or as loras[][name] fields, not both.", param="loras"
            )
        fields["loras"] = self.items

    def take(self, name: str, value: object) -> bool:
        """Keep `name=value` if it is a LoRA field (False: not one)."""
        match = _LORA_FIELD.match(name)
        if match is None:
            return False
        if not isinstance(value, str):
            raise OpenAIRefusal(400, f"`{name}` must be a text field.", param="loras")
        index, key = match[1], match[2]
        if index:
            if len(index) > 2:
                raise OpenAIRefusal(400, f"`{name}`: LoRA indices run from 0 to 99.", param="loras")
            item = self._indexed.get(int(index))
            if item is None:
                item = self._indexed[int(index)] = {}
                self.items.append(item)
        else:
            item = self.items[-1] if self.items else None
            if item is None or key in item:
                item = {}
                self.items.append(item)
        if key in item:
            raise OpenAIRefusal(400, f"The field {name!r} was sent more than once.", param="loras")
        item[key] = value
        return True


def job_failure(job_id: str, status: JobStatus, error: ErrorInfo | None) -> OpenAIRefusal:
    """The refusal of a call whose job ended without images. Its job existed, so the answer is never a
    5xx, which the SDKs retry (running the request again): what the input caused is a 400 as it would
    have been on submission; what went wrong on our side (out of memory, a timeout, a lost worker) is
    a 409 with OpenAI's `server_error` type and `x-should-retry: false`, naming the job."""
    if status is JobStatus.CANCELED:
        return OpenAIRefusal(409, f"Job {job_id} was canceled.", code=ErrorCode.JOB_CANCELED.value)
    code = error.code if error else ErrorCode.JOB_FAILED.value
    message = f"Job {job_id} failed: {error.message if error else 'no reason given'}"
    known = ERROR_CODES.get(code)  # type: ignore[call-overload]  # a StrEnum key is found by its value
    if known is not None and known.status < 500 and code != ErrorCode.JOB_FAILED.value:
        return OpenAIRefusal(400, message, code=code)
    return OpenAIRefusal(
        409,
        f"{message} Sending the same request again runs it again; the job stays at GET /v1/jobs/{job_id}.",
        type="server_error",
        code=code,
        headers={"x-should-retry": "false"},
    )


class ImageCall:
    """One OpenAI image call: its job, held until it ends, answered in OpenAI's shapes."""

    def __init__(
        self,
        request: Request,
        service: JobService,
        owner: str,
        params: ImageRequest,
        record: JobRecord,
        task: Task,
        base_url: str,
    ):
        self.request, self.service, self.owner, self.params = request, service, owner, params
        self.record, self.base_url = record, base_url
        self.event_prefix = "image_edit" if task is Task.EDIT else "image_generation"
        self.created = int(time.time())

    async def cancel(self) -> None:
        """The client went away: its job must not run (or go on running) for nobody."""
        with anyio.CancelScope(shield=True):
            try:
                await run_in_threadpool(self.service.cancel, self.owner, self.record.id)
            except (ServiceError, redis.RedisError):
                pass  # it ended meanwhile, or the store is away (the job's deadline still applies)

    async def hold(self) -> Response:
        """Wait for the job (polling the client); the answer, or a 408 naming the job."""
        deadline = time.monotonic() + self.service.settings.max_wait_s
        record = self.record
        while not record.status.is_terminal():
            if await self.request.is_disconnected():
                await self.cancel()
                return Response(status_code=499)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.timed_out()
            record = await run_in_threadpool(self.service.wait, record, min(POLL_S, remaining))
        return JSONResponse(await self.finished(record))

    def timed_out(self) -> OpenAIRefusal:
        """Past DREAMOMNI2_MAX_WAIT_S: the job goes on, and the SDK is told not to retry (a retry would
        be a second job running the same request)."""
        job_id = self.record.id
        # A 4xx: the service is fine, the wait is what the caller's deployment allows (and a 5xx never
        # follows the creation of a job).
        return OpenAIRefusal(
            408,
            f"Job {job_id} did not finish within {self.service.settings.max_wait_s} s; it goes on running: "
            f"fetch it later at GET /v1/jobs/{job_id}.",
            code=OpenAICode.TIMEOUT,
            headers={"x-should-retry": "false"},
        )

    async def finished(self, record: JobRecord) -> dict[str, Any]:
        """The ImagesResponse of a job that ended; a failed or canceled job is refused."""
        if record.status is not JobStatus.SUCCEEDED:
            raise job_failure(record.id, record.status, record.error)
        job = await run_in_threadpool(self.service.render, record, self.base_url)
        data = []
        for index, result in enumerate(job.results or []):
            if self.params.response_format == "url":
                data.append(ImageData(url=result.signed_url, revised_prompt=job.prompt))
            else:
                raw, _ = await run_in_threadpool(self.service.result, self.owner, record.id, index)
                data.append(ImageData(b64_json=base64.b64encode(raw).decode(), revised_prompt=job.prompt))
        first = (job.results or [None])[0]
        size = f"{first.width}x{first.height}" if first else "auto"
        answer = ImagesResponse(created=self.created, data=data, output_format=job.output_format, size=size)
        return answer.model_dump(exclude_none=True)

    async def events(self) -> AsyncIterator[dict[str, str]]:
        """`<kind>.partial_image` for the first `partial_images` previews, then `<kind>.completed`."""
        wanted = self.params.partial_images or 0
        sent = 0
        done = False
        assert self.service.aredis is not None, "the app's lifespan opens it"
        deadline = time.monotonic() + self.service.settings.max_wait_s
        stream = job_events(self.request, self.service.aredis, self.service, self.record.id, None)
        try:
            while True:
                try:
                    # The cap bounds the wait for the next event only, never a yield to the client.
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        event = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    done = True  # the job goes on: the error names it
                    yield {"event": "error", "data": json.dumps(self.timed_out().body())}
                    return
                data = json.loads(event["data"])
                if event["event"] == "progress" and "preview" in data and sent < wanted:
                    preview = data["preview"].split(",", 1)[1]
                    yield self._event("partial_image", preview, "jpeg", partial_image_index=sent)
                    sent += 1
                elif event["event"] in TERMINAL:
                    done = True
                    record = await run_in_threadpool(self.service.get, self.owner, self.record.id)
                    try:
                        answer = await self.finished(record)
                    except OpenAIRefusal as refusal:
                        yield {"event": "error", "data": json.dumps(refusal.body())}
                        return
                    for image in answer["data"]:
                        yield self._event(
                            "completed",
                            image["b64_json"],
                            answer["output_format"],
                            size=answer["size"],
                            revised_prompt=image.get("revised_prompt"),
                        )
                    return
        finally:
            if not done:
                await self.cancel()

    def _event(self, kind: str, b64: str, output_format: str, **extra: Any) -> dict[str, str]:
        body = {
            "type": f"{self.event_prefix}.{kind}",
            "b64_json": b64,
            "created_at": self.created,
            "output_format": output_format,
            "size": extra.pop("size", "auto"),
            "quality": "auto",
            "background": "opaque",
            **extra,
        }
        return {"event": body["type"], "data": json.dumps(body)}


async def create_images(
    request: Request,
    service: JobService,
    credentials: HTTPAuthorizationCredentials | None,
    base_url: str,
    task: Task,
) -> Response:
    async def work() -> Response:
        owner = request.app.state.keys.owner(credentials)
        if task is Task.EDIT:
            params, images = await read_edit(request, service)
        else:
            params, images = await read_generation(request)
        submission = Submission(images=images, options=to_options(params, task))
        key = request.headers.get("idempotency-key") or None
        record, _ = await run_in_threadpool(service.submit, owner, submission, key)
        call = ImageCall(request, service, owner, params, record, task, base_url)
        headers = {"X-Job-Id": record.id}
        if params.stream:
            return EventSourceResponse(
                call.events(),
                ping=15,
                headers={**headers, "Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        response = await call.hold()
        response.headers.update(headers)
        return response

    return await answer(work)
