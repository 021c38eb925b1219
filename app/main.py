"""`create_app(settings)`: the gateway, with nothing created at import time.

uvicorn --factory app.main:create_app
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import redis.asyncio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api_schemas.api import ErrorEnvelope
from app.auth import KeyRing
from app.errors import install_error_handlers
from app.metrics import GatewayMetrics
from app.middleware import CORS_HEADERS, EXPOSED_HEADERS, BodySizeLimit, Cors, HeadAsGet, RequestMetrics
from app.openapi import DESCRIPTION, openapi_document
from app.routes import (
    ASSETS_PATH,
    STATIC_DIR,
    SWAGGER_UI_DIR,
    docs_router,
    health_router,
    jobs_router,
    page_router,
    service_router,
)
from app.service import JobService
from app.settings import GatewaySettings
from workers.celery_app import create_celery
from workers.store import Store

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    # A connection for every thread that may block on Redis (and a few for the event loop's own
    # calls): a burst of held requests must wait for a thread, never fail for want of a connection.
    store = Store.from_url(settings.redis_url, settings.redis_prefix, max_connections=settings.threads + 16)
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
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocking Redis calls (including `Prefer: wait`) run in threads: allow enough of them.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        jobs.aredis = redis.asyncio.Redis.from_url(settings.redis_url, health_check_interval=30)
        sweeper = asyncio.create_task(expire_deadlines())
        yield
        sweeper.cancel()
        await jobs.aredis.aclose()
        store.redis.close()

    app = FastAPI(
        title="DreamOmni2 Serve",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by docs_router, offline
        redoc_url=None,
        responses={500: {"model": ErrorEnvelope, "description": "Unexpected error."}},
    )
    app.openapi = lambda: openapi_document(app, jobs.limits)
    app.state.settings = settings
    app.state.keys = KeyRing(settings)
    app.state.metrics = metrics
    app.state.jobs = jobs
    install_error_handlers(app)
    app.include_router(jobs_router)
    app.include_router(service_router)
    app.include_router(health_router)
    app.include_router(page_router)
    app.include_router(docs_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(ASSETS_PATH, StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(HeadAsGet)
    if settings.cors_origins:
        # Outermost: a preflight is answered before anything else looks at it.
        app.add_middleware(
            Cors,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=CORS_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
