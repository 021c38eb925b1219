"""`POST /v1/jobs` bodies: multipart/form-data or JSON with data URIs, both checked by one model."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api_schemas.api import JobOptions, JobRequestJSON
from api_schemas.common import Task
from api_schemas.errors import ErrorCode, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from api_schemas.jobs import JobLimits
from app.service import Submission

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*);base64,", re.ASCII)
#: Multipart parts besides the images a body may hold (every JobOptions field, and some slack).
MAX_FORM_FIELDS = 64


def decode_data_uri(uri: str, label: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,` URI; 413 when over `max_bytes`."""
    match = _DATA_URI.match(uri)
    if not match:
        raise InvalidInput(
            f"{label} must be a data URI like `data:image/png;base64,...`.",
            code=ErrorCode.INVALID_IMAGE,
            details={"image": label},
        )
    payload = uri[match.end() :]
    # Base64 carries 3 bytes per 4 characters: refuse before decoding something far too large.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLarge(
            f"{label} is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes} bytes.",
            code=ErrorCode.IMAGE_FILE_TOO_LARGE,
            details={"image": label, "max_bytes": max_bytes},
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{label} is not valid base64 after `;base64,`.",
            code=ErrorCode.INVALID_IMAGE,
            details={"image": label},
        ) from None


def invalid(exc: ValidationError) -> InvalidInput:
    """A pydantic error as the API's 422, every problem named by its field."""
    problems = [{"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"]} for e in exc.errors()]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return InvalidInput(
        f"The request is invalid: {summary}.", code=ErrorCode.INVALID_REQUEST, details={"errors": problems}
    )


def too_many(count: int, limits: JobLimits) -> InvalidInput:
    """More images than any task takes (an edit or a generation: DREAMOMNI2_MAX_IMAGES; a judge: one more)."""
    limit, judge = limits.max_images, limits.max_images_for(Task.JUDGE)
    return InvalidInput(
        f"{count} images were sent; at most {limit} are allowed (image 1 plus references; task=judge: "
        f"{judge}, the inputs then the output to judge).",
        code=ErrorCode.TOO_MANY_IMAGES,
        details={"images": count, "max": limit},
    )


async def read_submission(request: Request, limits: JobLimits) -> Submission:
    """The images and options of a multipart or JSON submission, checked by the same model."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, limits)
    if content_type == "application/json":
        return await _read_json(request, limits)
    raise UnsupportedMediaType(
        "Send the job as multipart/form-data (files in `images`) or as application/json."
    )


async def _read_multipart(request: Request, limits: JobLimits) -> Submission:
    max_files = 4 * limits.max_images + 4
    parser = _CompleteMultiPartParser(
        request.headers, request.stream(), max_files=max_files, max_fields=MAX_FORM_FIELDS
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        message = exc.message
        if message.startswith("Too many files"):
            raise InvalidInput(
                f"More than {max_files} files were sent; at most {limits.max_images} images are allowed "
                "(image 1 plus references).",
                code=ErrorCode.TOO_MANY_IMAGES,
                details={"max": limits.max_images},
            ) from None
        raise InvalidInput(
            f"The multipart body could not be read: {message}", code=ErrorCode.INVALID_REQUEST
        ) from None
    try:
        if not parser.complete:
            # The parser takes a body that stops early as it is: the parts before the cut would make
            # a job with fewer images than were sent.
            raise InvalidInput(
                "The multipart body ended before its closing boundary (the upload was cut off); "
                "send it again.",
                code=ErrorCode.INVALID_REQUEST,
            )
        images = await _form_images(form, limits)
        try:
            return Submission(images=images, options=JobOptions.model_validate(_form_fields(form)))
        except ValidationError as exc:
            raise invalid(exc) from None
    finally:
        await form.close()


class _CompleteMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, noting whether the closing boundary arrived."""

    complete = False

    def on_end(self) -> None:
        self.complete = True
        super().on_end()


def max_upload_images(limits: JobLimits) -> int:
    """The most images any task takes (a judge: the inputs and the output); `resolve_job` then holds
    each task to its own limit, once the task is known."""
    return max(limits.max_images_for(task) for task in Task)


async def _form_images(form: FormData, limits: JobLimits) -> list[bytes]:
    images: list[bytes] = []
    for value in form.getlist("images"):
        if not isinstance(value, UploadFile):
            raise InvalidInput("`images` must be file uploads.", code=ErrorCode.INVALID_REQUEST)
        if len(images) >= max_upload_images(limits):
            raise too_many(len(form.getlist("images")), limits)
        images.append(await value.read())
    return images


def _form_fields(form: FormData) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name == "images":
            continue
        if isinstance(value, UploadFile):
            raise InvalidInput(
                f"Unexpected file field {name!r}; images go in `images`.", code=ErrorCode.INVALID_REQUEST
            )
        if name == "webhook_events":
            fields.setdefault(name, []).extend(e.strip() for e in value.split(",") if e.strip())
        elif name in fields:
            raise InvalidInput(f"The field {name!r} was sent more than once.", code=ErrorCode.INVALID_REQUEST)
        elif value != "" or name == "instruction":
            # Empty form fields mean "not set", as browsers send them for blank inputs.
            fields[name] = value
    return fields


async def _read_json(request: Request, limits: JobLimits) -> Submission:
    try:
        body = JobRequestJSON.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid(exc) from None
    if len(body.images) > max_upload_images(limits):
        raise too_many(len(body.images), limits)
    max_bytes = limits.image_limits().max_bytes
    images = [decode_data_uri(uri, f"image {n}", max_bytes) for n, uri in enumerate(body.images, start=1)]
    options = JobOptions.model_validate(body.model_dump(exclude={"images"}, exclude_unset=True))
    return Submission(images=images, options=options)
