"""`binlat serve`: an HTTP API and a one-page UI over a loaded Pipeline (FastAPI app + uvicorn runner)."""
from .app import create_app
from .errors import ApiError
from .limits import ServeLimits
from .runner import bind_socket, is_loopback, serve
from .workqueue import WorkQueue

__all__ = ["ApiError", "ServeLimits", "WorkQueue", "bind_socket", "create_app", "is_loopback", "serve"]
