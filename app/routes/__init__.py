"""Thin routes, one router per resource: parse with the dependencies, call the service, shape the answer."""

from app.routes.health import health_router
from app.routes.jobs import jobs_router

__all__ = ["health_router", "jobs_router"]
