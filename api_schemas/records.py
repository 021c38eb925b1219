"""What crosses Redis: the stored job (its spec, progress, metadata, result) and webhook deliveries.

The gateway writes a `JobSpec` when it queues a job; the worker reads the `JobRecord` back and runs
`record.spec`; the job view and the webhooks render the same record. Every field is typed: a record
is validated as it is read from its Redis hash (`JobRecord.from_hash`), so a malformed or foreign
hash fails there, with pydantic's message, and nowhere downstream.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from api_schemas.api import ErrorInfo, JobStatus, OutputFormat, Progress, WebhookDelivery
from api_schemas.common import AdapterChoice, StepCache, Task, WebhookEvent
from api_schemas.jobs import JobMetadata, ResolvedJob


def _json(value: object) -> object:
    # Redis hash fields hold JSON text; an empty field means "not set".
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return json.loads(value) if value else None
    return value


def _empty_is_none(value: object) -> object:
    return None if value in ("", b"") else value


def _flag(value: object) -> object:
    return value == "1" if isinstance(value, str) else value


StoredJson = BeforeValidator(_json)
EmptyIsNone = BeforeValidator(_empty_is_none)


class WebhookSpec(BaseModel):
    """Where a job's webhooks go and for which events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    events: list[WebhookEvent]


class JobSpec(BaseModel):
    """A checked job, every default filled in: what the gateway queued and the worker runs.

    `job` is the request resolved once, at submission (`api_schemas.jobs.resolve_job`); the worker
    hands it to the engine as it is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: ResolvedJob
    output_format: OutputFormat
    webhook: WebhookSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_earlier_layout(cls, value: object) -> object:
        # Jobs queued before the resolved job was stored whole kept its parameters, task, adapter and
        # image count side by side; they run unchanged after an upgrade.
        if isinstance(value, dict) and "params" in value and "job" not in value:
            value = dict(value)
            params = dict(value.pop("params"))
            params.update(
                task=value.pop("task"), adapter=value.pop("adapter"), image_count=value.pop("image_count")
            )
            params.setdefault("step_cache", StepCache.NONE)
            value["job"] = params
        return value

    @property
    def task(self) -> Task:
        return self.job.task

    @property
    def adapter(self) -> AdapterChoice:
        return self.job.adapter

    @property
    def image_count(self) -> int:
        return self.job.image_count

    def wants(self, event: WebhookEvent) -> bool:
        """Whether this job's webhook is sent for `event`."""
        return self.webhook is not None and event in self.webhook.events


class StoredResult(BaseModel):
    """The result image's description (its bytes live under their own key)."""

    width: int
    height: int
    content_type: str
    bytes: int
    seed: int | None = None


class JobRecord(BaseModel):
    """A job as stored in its Redis hash, decoded and validated."""

    model_config = ConfigDict(extra="ignore")

    id: str
    owner: str = ""
    status: JobStatus
    spec: Annotated[JobSpec, StoredJson]
    created_at: float
    ttl_s: int
    attempts: int = 0
    run_token: Annotated[str | None, EmptyIsNone] = None
    started_at: Annotated[float | None, EmptyIsNone] = None
    finished_at: Annotated[float | None, EmptyIsNone] = None
    worker: Annotated[str | None, EmptyIsNone] = None
    progress: Annotated[Progress, BeforeValidator(lambda v: _json(v) or {})] = Progress()
    metadata: Annotated[JobMetadata | None, StoredJson] = None
    error: Annotated[ErrorInfo | None, StoredJson] = None
    result: Annotated[StoredResult | None, StoredJson] = None
    results: Annotated[list[StoredResult] | None, StoredJson] = None
    deadline_at: Annotated[float | None, EmptyIsNone] = None
    cancel_requested: Annotated[bool, BeforeValidator(_flag)] = False
    cancel_reason: Annotated[str | None, EmptyIsNone] = None
    webhook: Annotated[WebhookDelivery | None, StoredJson] = None
    #: The submit request's `X-Request-ID` and the W3C `traceparent` of its span (tracing on), for the
    #: worker's log lines and spans; absent from jobs stored before they were kept.
    request_id: Annotated[str | None, EmptyIsNone] = None
    traceparent: Annotated[str | None, EmptyIsNone] = None

    @property
    def all_results(self) -> list[StoredResult]:
        """Every result image, in order (a record from before `results` existed has only `result`)."""
        return self.results or ([self.result] if self.result else [])

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        """Validate a job from the fields of its Redis hash."""
        return cls.model_validate({k.decode(): v.decode() for k, v in raw.items()})


class DeliveryRecord(BaseModel):
    """One webhook delivery as stored: the body is fixed at creation, the same on every attempt."""

    job_id: str
    owner: str
    url: str
    event: WebhookEvent
    body: str
    attempts: int = 0
    #: Delivered, or out of attempts: nothing more is sent.
    done: bool = False
    #: The job's (`JobRecord`): each attempt's log lines and span belong to the job's request and trace.
    request_id: str | None = None
    traceparent: str | None = None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> DeliveryRecord:
        return cls.model_validate({k.decode(): v.decode() for k, v in raw.items()})
