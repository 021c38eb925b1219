"""The REST API's shapes: the job object, its parts, and the one error envelope."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api_schemas.common import AdapterChoice, StepCache, Task, WebhookEvent
from api_schemas.jobs import MAX_RESULTS as MAX_RESULTS
from api_schemas.jobs import JobParameters
from api_schemas.loras import AppliedLora, LoraInfo
from api_schemas.text_tasks import TextOutput


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_input`, `out_of_memory`.")
    message: str = Field(description="What went wrong and what to do about it.")
    details: dict[str, Any] | None = Field(default=None, description="Numbers and names behind the message.")


class HttpErrorInfo(ErrorInfo):
    """The error of an error answer: a job's `error` fields, and the request's id."""

    request_id: str | None = Field(
        default=None,
        description="The request's id, as in the `X-Request-ID` answer header: quote it when reporting a "
        "problem (the service's logs carry it).",
    )


class ErrorEnvelope(BaseModel):
    """Every error the service returns has this shape."""

    error: HttpErrorInfo

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "error": {
                    "code": "too_many_images",
                    "message": "6 images were sent; at most 5 are allowed (image 1 plus references).",
                    "details": {"images": 6, "max": 5},
                    "request_id": "5f0c3b6e2d8a4f7c9e1b0a2d4c6e8f10",
                }
            }
        }
    )


class Progress(BaseModel):
    stage: str | None = Field(
        default=None,
        description="translate, encode, denoise or decode; a text job (judge, mixing_prompts): generate "
        "(step: tokens written so far, total: the most its answer may take).",
    )
    step: int = Field(default=0, description="Denoising steps done (or 0/1 for the other stages).")
    total: int = Field(default=0, description="Steps in the current stage.")


class ProgressEvent(Progress):
    """The data of a `progress` event on a job's event stream: the progress, and on some denoising
    steps a preview. The job object's `progress` is the latest of these without its preview."""

    preview: str | None = Field(
        default=None,
        description="Every DREAMOMNI2_PREVIEW_EVERY-th denoising step: the image as it forms (the current "
        "estimate of the result; a Feature Mixing pair, or images sampled as one batch: side by side), a "
        "small `data:image/jpeg;base64,...` URI of a few KB (a pixel per 8x8 of the output, at most 256 a "
        "side).",
    )


class ResultInfo(BaseModel):
    url: str = Field(description="The image, for a caller with the job's API key (relative).")
    width: int
    height: int
    content_type: str
    bytes: int
    seed: int | None = Field(
        default=None, description="The seed this image was sampled with (image i of a job: seed + i)."
    )
    signed_url: str | None = Field(
        default=None,
        description="The image at an absolute, expiring link that needs no API key (an `<img>` tag, a "
        "webhook receiver, another service can fetch it): `GET /v1/results/{job_id}?index=&expires=&"
        "signature=`. Anyone holding it can download the image until `signed_url_expires_at`; ask for the "
        "job again for a fresh one. Left out of webhooks when the deployment has no DREAMOMNI2_PUBLIC_URL.",
    )
    signed_url_expires_at: datetime | None = Field(
        default=None, description="When `signed_url` stops working (410 `link_expired` from then on)."
    )


class WebhookDelivery(BaseModel):
    id: str = Field(description="The `webhook-id` of the delivery (the same on every attempt).")
    event: WebhookEvent
    status: str = Field(description="pending, retrying, delivered or failed.")
    attempts: int
    status_code: int | None = Field(default=None, description="The receiver's last HTTP status.")
    error: str | None = None
    at: datetime | None = None


class WebhookInfo(BaseModel):
    url: str
    events: list[WebhookEvent]
    last_delivery: WebhookDelivery | None = Field(default=None, description="The latest delivery's outcome.")


class JobLinks(BaseModel):
    self_: str = Field(alias="self", serialization_alias="self")
    result: str

    model_config = ConfigDict(populate_by_name=True)


class Job(BaseModel):
    """The job object: what was asked, where it is, and what came of it."""

    id: str
    status: JobStatus
    task: Task
    adapter: AdapterChoice = Field(description="base (plain Kontext), edit or generation LoRA.")
    image_count: int
    instruction: str | None = Field(default=None, description="The instruction (not for feature_mixing).")
    source_prompt: str | None = Field(default=None, description="Feature Mixing: the source image's prompt.")
    target_prompt: str | None = Field(default=None, description="Feature Mixing: the target image's prompt.")
    attribute: str | None = Field(
        default=None,
        description="Feature Mixing: the shared attribute's label; mixing_prompts: the attribute keyword.",
    )
    count: int | None = Field(default=None, description="mixing_prompts: how many prompt pairs it writes.")
    mixing: dict[str, str | float | int] | None = Field(
        default=None,
        description="Feature Mixing: the mixing parameters (blocks, step_fraction, strength) and, once run, "
        "the mixed_steps and mixed_layers.",
    )
    prompt: str | None = Field(default=None, description="The prompt sampled with, once known.")
    translated: bool | None = Field(default=None, description="Whether the translator's prompt was used.")
    fallback_reason: str | None = None
    seed: int | None = Field(default=None, description="The first image's seed; image i uses seed + i.")
    num_images: int = Field(default=1, description="How many images the job samples (`results`).")
    steps: int
    guidance: float
    output_format: OutputFormat
    step_cache: StepCache = Field(default=StepCache.NONE, description="The step cache the job runs with.")
    loras: list[AppliedLora] = Field(
        default=[], description="The registered LoRAs stacked on the adapter, in order, with their scales."
    )
    speed_profile: str | None = Field(default=None, description="The worker's speed profile, once run.")
    transformer_evaluations: int | None = Field(
        default=None, description="Full transformer passes that ran, once finished (a step cache skips some)."
    )
    progress: Progress = Field(default_factory=Progress)
    queue_position: int | None = Field(default=None, description="1 = next to run; only while queued.")
    attempts: int = Field(default=0, description="Runs started; more than 1 after a worker was lost.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timings: dict[str, float] | None = Field(default=None, description="Seconds per stage, once finished.")
    error: ErrorInfo | None = None
    result: ResultInfo | None = Field(
        default=None, description="The result image (a pair's source), once succeeded."
    )
    results: list[ResultInfo] | None = Field(
        default=None,
        description="Every result image, once succeeded: one, or a Feature Mixing pair (source at "
        "`result?index=0`, target at `result?index=1`).",
    )
    output: TextOutput | None = Field(
        default=None,
        description="A text job (`judge`, `mixing_prompts`), once succeeded: its JSON result (it has no "
        "result image: `GET .../result` answers 404 `result_index`). judge: the three scores 1..5, "
        "`reason`, `success` (every score above 3), or `unscored: true` (no score: the answer could not "
        "be used; see `output_raw`). mixing_prompts: `attribute` and `pairs` of "
        "`source_prompt`/`target_prompt`.",
    )
    output_raw: str | None = Field(
        default=None, description="A text job, once succeeded: the language model's answer as decoded."
    )
    cancel_requested: bool = Field(default=False, description="A cancel was asked while the job was running.")
    cancel_reason: str | None = Field(
        default=None, description="`requested` (POST .../cancel) or `deadline`, once a cancel applies."
    )
    deadline_at: datetime | None = Field(default=None, description="Not started by then: canceled unrun.")
    webhook: WebhookInfo | None = None
    links: JobLinks

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "j_5f2c8a0e6b7d4c1e9a3b2f10",
                "status": "succeeded",
                "task": "edit",
                "adapter": "edit",
                "image_count": 2,
                "instruction": "make the bag in image 1 use the pattern of the dress in image 2",
                "prompt": "make the bag in image 1 use the pattern of the dress in image 2",
                "translated": False,
                "fallback_reason": "unparseable",
                "seed": 42,
                "steps": 30,
                "guidance": 3.5,
                "output_format": "png",
                "progress": {"stage": "decode", "step": 1, "total": 1},
                "queue_position": None,
                "attempts": 1,
                "created_at": "2026-11-27T10:00:00Z",
                "started_at": "2026-11-27T10:00:01Z",
                "finished_at": "2026-11-27T10:00:09Z",
                "timings": {"translate": 1.2, "encode": 0.3, "denoise": 6.1, "decode": 0.2, "total": 7.8},
                "error": None,
                "result": {
                    "url": "/v1/jobs/j_5f2c8a0e6b7d4c1e9a3b2f10/result",
                    "width": 1024,
                    "height": 1024,
                    "content_type": "image/png",
                    "bytes": 1532211,
                    "signed_url": "https://dreamomni2.example.com/v1/results/j_5f2c8a0e6b7d4c1e9a3b2f10"
                    "?index=0&expires=1795777200&signature=8PI2swCPv-yHL5VBdZ6OjD_r0y-YGjKikTlEAuPL86E",
                    "signed_url_expires_at": "2026-11-27T11:00:00Z",
                },
                "links": {
                    "self": "/v1/jobs/j_5f2c8a0e6b7d4c1e9a3b2f10",
                    "result": "/v1/jobs/j_5f2c8a0e6b7d4c1e9a3b2f10/result",
                },
            }
        }
    )


class JobOptions(JobParameters):
    """Every field of `POST /v1/jobs` but the images (multipart form fields, or JSON members)."""

    output_format: OutputFormat = OutputFormat.PNG
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="Where to POST signed job events (Standard Webhooks)."
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None, description="Which events to send: started, progress, completed (default: completed)."
    )
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        description="Cancel the job unrun if no worker starts it within this many seconds (`Cancel-After`).",
    )


class JobRequestJSON(JobOptions):
    """`POST /v1/jobs` as JSON: the multipart fields, with images as base64 data URIs."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                # Two real 16x16 PNGs: the example is a request the service accepts as it is.
                "images": [
                    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGUlEQVR4nGM8oWHDQApgIkn1qIZRDUNKAwDJMQFMogTzfQAAAABJRU5ErkJggg==",
                    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGUlEQVR4nGOUizrBQApgIkn1qIZRDUNKAwAFIgFgCRCdbAAAAABJRU5ErkJggg==",
                ],
                "instruction": "make the bag in image 1 use the pattern of the dress in image 2",
                "task": "edit",
                "seed": 42,
                "steps": 28,
                "output_format": "png",
            }
        },
    )

    images: list[str] = Field(
        default_factory=list,
        description="Image 1..n as `data:image/...;base64,` URIs. task=judge: the case's input images in "
        "order, then the output image to judge, last.",
    )


class WorkerCounts(BaseModel):
    up: int = Field(description="Worker processes that sent a heartbeat recently.")
    ready: int = Field(
        description="Of those, how many have their models loaded and their consumer connected (they take "
        "jobs)."
    )
    memory_modes: dict[str, int] = Field(
        default_factory=dict,
        description="Ready workers per memory mode (`DREAMOMNI2_MEMORY`: resident, balanced, low, stream).",
    )
    speed_fallbacks: dict[str, int] = Field(
        default_factory=dict,
        description="Ready workers that could not apply their speed profile (`DREAMOMNI2_SPEED`) on their "
        "machine, per what they serve instead: `reference` (it could not compile there, e.g. no C compiler "
        "or Python headers: nothing of the profile applied) or `eager` (applied, but its warm-up compile "
        "failed: the blocks run uncompiled). They serve jobs, slower than planned; each worker's log and "
        "readiness info (`memory.speed.error`) say why. Empty when every ready worker serves its profile.",
    )


class Readiness(BaseModel):
    status: str = Field(description="`ready` or `unavailable`.")
    redis: str = Field(description="`ok` or the connection error.")
    workers: WorkerCounts | None = None
    queue_depth: int | None = None


class ServiceInfo(BaseModel):
    """What a client needs to know before it submits: whether keys are required, the limits, the choices.

    Public and read-only: everything here is in the error messages anyway; nothing here is a secret.
    """

    auth_required: bool = Field(description="Whether `/v1` calls need `Authorization: Bearer <key>`.")
    max_images: int = Field(description="Images per job, image 1 included (`DREAMOMNI2_MAX_IMAGES`).")
    max_num_images: int = Field(
        description="Output images one job may ask for (`num_images`; `DREAMOMNI2_MAX_NUM_IMAGES`).",
    )
    max_image_bytes: int = Field(description="Bytes per image (`DREAMOMNI2_MAX_IMAGE_BYTES`).")
    max_request_bytes: int = Field(description="Bytes per request body (`DREAMOMNI2_MAX_REQUEST_BYTES`).")
    max_instruction_chars: int = Field(description="Characters of the instruction.")
    min_steps: int
    max_steps: int
    default_steps: int = Field(description="`steps` when left out.")
    min_guidance: float
    max_guidance: float
    default_guidance: float = Field(description="`guidance` when left out.")
    min_size: int = Field(description="Smallest `width`/`height` of a generation.")
    max_size: int = Field(description="Largest `width`/`height` of a generation.")
    default_size: int = Field(description="Generation size when left out.")
    max_aspect_ratio: float = Field(description="Longest side over shortest side of a generation size.")
    output_formats: list[OutputFormat] = Field(description="Values `output_format` takes.")
    step_caches: list[StepCache] = Field(description="Values `step_cache` may take here (`none` first).")
    default_step_cache: StepCache = Field(description="The step cache of a request that names none.")
    loras: list[LoraInfo] = Field(
        description="The LoRAs `loras` may name here (DREAMOMNI2_LORAS): name, default scale, tasks."
    )
    max_loras_per_job: int = Field(description="LoRAs one job may stack (DREAMOMNI2_MAX_LORAS_PER_JOB).")
    min_lora_scale: float = Field(description="Smallest scale of a LoRA.")
    max_lora_scale: float = Field(description="Largest scale of a LoRA.")

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "auth_required": True,
                "max_images": 5,
                "max_image_bytes": 20971520,
                "max_request_bytes": 115343360,
                "max_instruction_chars": 2000,
                "min_steps": 1,
                "max_steps": 100,
                "default_steps": 30,
                "min_guidance": 0.0,
                "max_guidance": 30.0,
                "default_guidance": 3.5,
                "min_size": 64,
                "max_size": 4096,
                "default_size": 1024,
                "max_aspect_ratio": 4.0,
                "output_formats": ["png", "jpeg", "webp"],
                "step_caches": ["none", "first_block", "taylorseer"],
                "default_step_cache": "none",
            }
        }
    )
