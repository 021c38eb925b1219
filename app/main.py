"""`create_app(settings)`: the gateway, with nothing created at import time.

uvicorn --factory app.main:create_app
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import redis.asyncio
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api_schemas.api import ErrorEnvelope, JobRequestJSON
from app.auth import KeyRing
from app.errors import install_error_handlers
from app.metrics import GatewayMetrics
from app.middleware import BodySizeLimit, RequestMetrics
from app.routes import health_router, jobs_router
from app.service import JobService
from app.settings import GatewaySettings
from workers.celery_app import create_celery
from workers.store import JobStore

logger = logging.getLogger(__name__)

DESCRIPTION = """
Multimodal instruction-based image editing and generation with DreamOmni2 (FLUX.1 Kontext +
DreamOmni2 LoRAs + a Qwen2.5-VL instruction translator).

Submit images and a plain-words instruction (`POST /v1/jobs`), then poll the job
(`GET /v1/jobs/{id}`) or hold the request with `Prefer: wait=N`, and download the image
(`GET /v1/jobs/{id}/result`). Every error has the shape `{"error": {"code", "message", "details"}}`.
Authenticate with `Authorization: Bearer <key>` when the deployment has API keys.
"""


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the JSON body schema that `POST /v1/jobs` refers to by `$ref`.

    That route reads its body itself (multipart or JSON), so FastAPI does not collect the model.
    """
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        body = JobRequestJSON.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in body.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas["JobRequestJSON"] = body
    return app.openapi_schema


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    store = JobStore.from_url(settings.redis_url, settings.redis_prefix)
    metrics = GatewayMetrics(store)

    jobs = JobService(settings, store, create_celery(settings), metrics)

    async def expire_deadlines() -> None:
        # Deadlines must hold even while no worker runs (workers may scale to zero): the gateway
        # sweeps them. Every replica may; the store's cancel is atomic.
        while True:
            try:
                await run_in_threadpool(jobs.expire_deadlines)
            except Exception as exc:
                logger.warning("deadline sweep failed: %s", exc)
            await asyncio.sleep(settings.deadline_sweep_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Blocking Redis calls (including `Prefer: wait`) run in threads: allow enough of them.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        app.state.aredis = redis.asyncio.Redis.from_url(settings.redis_url, health_check_interval=30)
        sweeper = asyncio.create_task(expire_deadlines())
        yield
        sweeper.cancel()
        await app.state.aredis.aclose()
        store.redis.close()

    app = FastAPI(
        title="DreamOmni2 Serve",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={500: {"model": ErrorEnvelope, "description": "Unexpected error."}},
    )
    app.openapi = lambda: openapi_document(app)
    app.state.settings = settings
    app.state.keys = KeyRing(settings)
    app.state.metrics = metrics
    app.state.jobs = jobs
    install_error_handlers(app)
    app.include_router(jobs_router)
    app.include_router(health_router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
