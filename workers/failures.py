"""How a job ends when its run raises: the one table from exceptions to job outcomes."""

from __future__ import annotations

from dataclasses import dataclass

from api_schemas.api import ErrorInfo, JobStatus
from api_schemas.errors import ErrorCode, JobCanceled, ServiceError


@dataclass(frozen=True)
class JobEnd:
    """A job's final status, its error (none on success) and the outcome label of the metrics."""

    status: JobStatus
    outcome: str
    error: ErrorInfo | None = None


SUCCEEDED = JobEnd(JobStatus.SUCCEEDED, "succeeded")


def job_end(exc: BaseException) -> JobEnd:
    """The outcome of a run that raised `exc` (`LeaseLost` is not an outcome: the run writes nothing).

    canceled: `JobCanceled` (by its owner or its deadline). failed with the error's own code: every
    other `ServiceError` (timeout, out_of_memory, an input the worker refused). failed with
    out_of_memory: the host ran out of memory. failed with internal: anything else, logged by the caller.
    """
    if isinstance(exc, JobCanceled):
        return JobEnd(JobStatus.CANCELED, "canceled", ErrorInfo(**exc.to_dict()))
    if isinstance(exc, ServiceError):
        return JobEnd(JobStatus.FAILED, exc.code.value, ErrorInfo(**exc.to_dict()))
    if isinstance(exc, MemoryError):
        message = "The worker ran out of host memory for this job."
        return JobEnd(
            JobStatus.FAILED,
            ErrorCode.OUT_OF_MEMORY.value,
            ErrorInfo(code=ErrorCode.OUT_OF_MEMORY, message=message),
        )
    message = "The worker hit an unexpected error running this job; it is in the worker log."
    return JobEnd(
        JobStatus.FAILED, ErrorCode.INTERNAL.value, ErrorInfo(code=ErrorCode.INTERNAL, message=message)
    )
