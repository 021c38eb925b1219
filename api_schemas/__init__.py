"""Contracts shared by the gateway and the workers (no torch, no FastAPI, no Celery imports)."""

from api_schemas.common import AdapterChoice, Task
from api_schemas.errors import (
    Conflict,
    InvalidInput,
    ModelOutOfMemory,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
)

__all__ = [
    "AdapterChoice",
    "Conflict",
    "InvalidInput",
    "ModelOutOfMemory",
    "NotFound",
    "PayloadTooLarge",
    "ServiceError",
    "Task",
    "Unauthorized",
]
