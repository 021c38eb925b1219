"""Thin routes, one router per resource: parse with the dependencies, call the service, shape the answer."""

from app.routes.docs import ASSETS_PATH, SWAGGER_UI_DIR, docs_router
from app.routes.health import health_router
from app.routes.jobs import jobs_router
from app.routes.openai_images import openai_router
from app.routes.page import STATIC_DIR, page_router
from app.routes.results import results_router
from app.routes.service import service_router

__all__ = [
    "ASSETS_PATH",
    "STATIC_DIR",
    "SWAGGER_UI_DIR",
    "docs_router",
    "health_router",
    "jobs_router",
    "openai_router",
    "page_router",
    "results_router",
    "service_router",
]
