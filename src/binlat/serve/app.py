"""The HTTP API and page: `create_app(pipe, limits)` builds a FastAPI app around one loaded Pipeline.

Requests are checked completely before they reach the model; the model runs in a fixed pool of
`max_concurrent` worker threads, and at most `max_queue` requests may be admitted (reading their body, waiting or
running) at once: one more is answered 429 straight away, before its body is read, instead of piling up. Only
requests whose Host is on `allowed_hosts` (loopback names by default) are served. Every error is JSON
`{"error": "..."}` with a 4xx status saying what was wrong, or 500 for an unexpected failure (logged; the server
keeps running).

The parts: schemas.py (request and response bodies), bodies.py (reading them), limits.py (ServeLimits and the
checks), workqueue.py, errors.py (error handlers), guards.py (the middlewares that refuse requests: host, origin,
admission and body), routes.py, and runner.py (uvicorn, with the connection limits and rate-limited logs).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from ..pipeline import Pipeline
from .errors import add_error_handlers
from .guards import (
    LOOPBACK_HOSTS,
    AdmissionMiddleware,
    HostAllowListMiddleware,
    SameOriginMiddleware,
    check_allowed_hosts,
)
from .limits import Checks, ServeLimits
from .page import page_html
from .routes import Served, add_routes
from .schemas import request_bodies
from .workqueue import WorkQueue, serialise_text_encoder


def create_app(
    pipe: Pipeline, limits: ServeLimits | None = None, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS
) -> FastAPI:
    """`allowed_hosts`: the names a request's Host header may give (guards.check_allowed_hosts); a request for any
    other name, as DNS rebinding makes, is refused."""
    limits = limits or ServeLimits()
    allowed_hosts = check_allowed_hosts(allowed_hosts)
    queue = WorkQueue(limits.max_concurrent, limits.max_queue)
    if limits.max_concurrent > 1:
        serialise_text_encoder(pipe)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(
        title="binlat",
        version=_version(),
        lifespan=lifespan,
        description='Text-to-image generation in a 1D binary latent space. Every error answers {"error": "..."}.',
        **_json_without_content_type(),
    )
    bodies = request_bodies()  # with the settings of the kinds registered now; the page offers the same
    app.state.served = Served(pipe, limits, queue, Checks(pipe, limits), bodies, page_html(bodies))
    app.state.allowed_hosts = allowed_hosts
    # Added innermost first; a request refused by an outer one never reaches the queue, and its body is never read.
    app.add_middleware(AdmissionMiddleware, queue=queue, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    app.add_middleware(SameOriginMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(HostAllowListMiddleware, allowed_hosts=allowed_hosts)
    add_error_handlers(app)
    add_routes(app.router, bodies)
    return app


def _json_without_content_type() -> dict[str, Any]:
    # Newer FastAPI (with `strict_content_type`) leaves a body without a Content-Type unparsed unless told;
    # this API has always read such a body as JSON.
    return {"strict_content_type": False} if "strict_content_type" in inspect.signature(FastAPI).parameters else {}


def _version() -> str:
    from .. import __version__

    return __version__
