"""Errors and the one middleware: every failure is answered as JSON `{"error": "..."}`.

`ApiError` is what the server's own checks raise; the exception handlers installed by `add_error_handlers`
give it, FastAPI's HTTP and validation errors and anything unexpected the same JSON shape.
`BodyLimitMiddleware` bounds request bodies before any route reads them; `SameOriginMiddleware` refuses requests
that a browser sends on behalf of another site's page.
"""
from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("binlat.serve")


class ApiError(Exception):
    """A request the server will not serve: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def internal_error(request: Request, e: Exception) -> ApiError:
    """Log an unexpected exception with its traceback; the 500 ApiError to answer the request with."""
    log.error("unexpected error in %s %s", request.scope.get("method"), request.scope.get("path"), exc_info=e)
    return ApiError(500, f"internal error ({type(e).__name__}); see the server log")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            message = "not found: see /docs for the endpoints"
        return error_response(e.status_code, message, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        # Request bodies are translated field by field in routes.ApiRoute; this covers anything else.
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
        # Only what escapes outside a route lands here (routes.ApiRoute answers the rest itself): Starlette calls
        # this from its outermost middleware and then re-raises, so the server logs the traceback.
        return error_response(500, f"internal error ({type(e).__name__}); see the server log")


class BodyLimitMiddleware:
    """Reject a request body over `max_bytes` with 413: at once from Content-Length, else while reading (the
    body is read here, at most max_bytes of it, and handed on to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await self._too_large(scope, receive, send, declared)
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope, receive, send, None)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else "more"
        response = error_response(413, f"request body too large: {size} sent, this server accepts at most "
                                       f"{self.max_bytes} bytes (max_body_bytes)", headers={"Connection": "close"})
        await response(scope, receive, send)


class SameOriginMiddleware:
    """Refuse (403) a POST that a browser makes for a page of another site. Such a page can send a "simple"
    request (form fields, text/plain, or JSON without a Content-Type) without the user's say; the server would run
    it. Browsers name the page's origin (`Origin`) and say whether the request is cross-site (`Sec-Fetch-Site`);
    clients that are not browsers send neither and are unaffected."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = dict(scope.get("headers") or [])
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1").lower()
            foreign = site == "cross-site" or (origin not in ("", "null") and urlsplit(origin).netloc.lower() != host)
            if foreign or origin == "null":
                response = error_response(403, f"cross-site request refused (Origin {origin or '-'}, Sec-Fetch-Site "
                                               f"{site or '-'}): call the API from its own page or without a browser")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
