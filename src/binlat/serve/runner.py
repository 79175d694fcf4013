"""Run the app with uvicorn on a socket bound here first, so a busy port or a bad host is a clear error."""
from __future__ import annotations

import ipaddress
import socket
import sys

from fastapi import FastAPI


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback ranges (127.0.0.0/8, ::1); names other than localhost count as
    not loopback, since they may resolve anywhere."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one); OSError names the address."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info",
          sock: socket.socket | None = None) -> None:
    """Serve until interrupted (Ctrl+C / SIGTERM stop it gracefully)."""
    import uvicorn

    sock = sock or bind_socket(host, port)
    if not is_loopback(host):
        print(f"binlat: warning: listening on {host}, which is not a loopback address: anyone who can reach "
              f"this machine can use the model (the API has no authentication)", file=sys.stderr, flush=True)
    print(f"binlat: serving on {url_of(sock)} (page at /, API docs at /docs)", flush=True)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=bound_host, port=bound_port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
