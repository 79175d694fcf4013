"""Errors: every failure is answered as JSON `{"error": "..."}`.

`ApiError` is what the server's own checks raise; the exception handlers installed by `add_error_handlers`
give it, FastAPI's HTTP and validation errors and anything unexpected the same JSON shape. The middlewares that
refuse requests before a route sees them (host, origin, admission, body) are in guards.py.
"""

from __future__ import annotations

import json
import logging

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


class ClientGone(ApiError):
    """The client disconnected before its answer was ready: its work was dropped or stopped (nobody reads the
    answer; 499 is the status proxies log for it)."""

    def __init__(self) -> None:
        super().__init__(499, "client disconnected; its request was cancelled")


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
