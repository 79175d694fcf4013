"""The HTTP API and page: `create_app(pipe, limits)` builds a FastAPI app around one loaded Pipeline.

Requests are checked completely before they reach the model; the model runs in a fixed pool of
`max_concurrent` worker threads, and at most `max_queue` requests may be admitted (running or waiting) at once:
one more is answered 429 straight away instead of piling up. Every error is JSON `{"error": "..."}` with a 4xx
status saying what was wrong, or 500 for an unexpected failure (logged; the server keeps running).

The parts: schemas.py (request and response bodies), bodies.py (reading them), limits.py (ServeLimits and the
checks), workqueue.py, errors.py (error handlers and the body-size middleware) and routes.py.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

from fastapi import FastAPI

from ..pipeline import Pipeline
from .errors import BodyLimitMiddleware, SameOriginMiddleware, add_error_handlers
from .limits import Checks, ServeLimits
from .routes import Served, add_routes
from .workqueue import WorkQueue, serialise_text_encoder


def create_app(pipe: Pipeline, limits: ServeLimits | None = None) -> FastAPI:
    limits = limits or ServeLimits()
    queue = WorkQueue(limits.max_concurrent, limits.max_queue)
    if limits.max_concurrent > 1:
        serialise_text_encoder(pipe)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(title="binlat", version=_version(), lifespan=lifespan,
                  description="Text-to-image generation in a 1D binary latent space. Every error answers "
                              "{\"error\": \"...\"}.", **_json_without_content_type())
    app.state.served = Served(pipe, limits, queue, Checks(pipe, limits))
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(SameOriginMiddleware)  # outermost: a refused request's body is never read
    add_error_handlers(app)
    add_routes(app.router)
    return app


def _json_without_content_type() -> dict[str, Any]:
    # Newer FastAPI (with `strict_content_type`) leaves a body without a Content-Type unparsed unless told;
    # this API has always read such a body as JSON.
    return {"strict_content_type": False} if "strict_content_type" in inspect.signature(FastAPI).parameters else {}


def _version() -> str:
    from .. import __version__
    return __version__
