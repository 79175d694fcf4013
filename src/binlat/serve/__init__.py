"""`binlat serve`: an HTTP API and a one-page UI over a loaded Pipeline (FastAPI app + uvicorn runner)."""
from .app import ApiError, ServeLimits, WorkQueue, create_app
from .runner import bind_socket, is_loopback, serve

__all__ = ["ApiError", "ServeLimits", "WorkQueue", "bind_socket", "create_app", "is_loopback", "serve"]
