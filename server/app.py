"""The FastAPI application of one API replica."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from server.errors import error_body, install_handlers
from server.metrics import ServerMetrics
from server.middleware import BodyLimitMiddleware, MetricsMiddleware
from server.routes import ROUTERS
from server.settings import ServerSettings
from server.state import AppState

log = logging.getLogger(__name__)

DESCRIPTION = """A continual-learning inference server. Every prediction runs on one small, seeded
weight perturbation (a vendor path); labels, given with the request or later, let the reconciler
publish a better version from forward passes alone. Every answer names the version that produced it."""


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """An app for ``settings`` (default: from the environment); its lifespan owns every resource."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await AppState.start(settings, metrics)
        app.state.mp = state
        try:
            yield
        finally:
            await state.close()

    # the docs pages load Swagger UI and ReDoc from the package: FastAPI's defaults fetch them from a CDN, and
    # render blank on a machine without internet access, as many production networks are
    app = FastAPIOffline(title="mpserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    for router in ROUTERS:
        app.include_router(router)
    install_handlers(app)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, details in the log
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body(request.url.path, f"internal error ({type(exc).__name__}); see the server log"),
                            500)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: 413s are counted too
    return app
