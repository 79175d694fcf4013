"""`binlat serve`: an HTTP API and a one-page UI over a loaded Pipeline (FastAPI app + uvicorn runner)."""

from .app import create_app
from .errors import ApiError
from .guards import LOOPBACK_HOSTS
from .limits import ServeLimits
from .runner import allowed_hosts_for, bind_socket, is_loopback, serve, uvicorn_config
from .workqueue import WorkQueue

__all__ = [
    "LOOPBACK_HOSTS",
    "ApiError",
    "ServeLimits",
    "WorkQueue",
    "allowed_hosts_for",
    "bind_socket",
    "create_app",
    "is_loopback",
    "serve",
    "uvicorn_config",
]
