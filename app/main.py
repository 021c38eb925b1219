"""`create_app(settings)`: the gateway, with nothing created at import time.

uvicorn --factory app.main:create_app
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api_schemas.api import ErrorEnvelope
from app.auth import KeyRing
from app.errors import install_error_handlers
from app.metrics import GatewayMetrics
from app.middleware import CORS_HEADERS, EXPOSED_HEADERS, BodySizeLimit, Cors, HeadAsGet, RequestMetrics
from app.openapi import DESCRIPTION, openapi_document
from app.request_id import RequestId
from app.routes import (
    ASSETS_PATH,
    STATIC_DIR,
    SWAGGER_UI_DIR,
    docs_router,
    health_router,
    jobs_router,
    openai_router,
    page_router,
    results_router,
    service_router,
)
from app.service import JobService
from app.settings import GatewaySettings
from workers.celery_app import create_celery
from workers.logs import configure_logging
from workers.store import Store
from workers.tracing import configure_tracing

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    configure_logging(settings.log_format)
    # A connection for every thread that may block on Redis (and a few for the event loop's own
    # calls): a burst of held requests must wait for a thread, never fail for want of a connection.
    store = Store.from_settings(settings, max_connections=settings.threads + 16)
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
        jobs.aredis = settings.redis_target.async_client()
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
    app.include_router(openai_router)
    app.include_router(results_router)
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
    app.add_middleware(RequestId)  # outermost: every answer has the header, a refused preflight too
    if configure_tracing("dreamomni2-gateway"):
        instrument(app)
    return app


def instrument(app: FastAPI) -> None:
    """A server span for every request (its `traceparent` header continued), around everything else;
    the probes and the metrics scrape are left out unless OTEL_PYTHON_FASTAPI_EXCLUDED_URLS says
    otherwise."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    excluded = None if os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") else "healthz,readyz,metrics"
    FastAPIInstrumentor.instrument_app(app, excluded_urls=excluded, exclude_spans=["receive", "send"])
