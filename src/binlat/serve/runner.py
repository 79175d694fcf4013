"""Run the app with uvicorn on a socket bound here first, so a busy port or a bad host is a clear error.

uvicorn gets the connection limits of ServeLimits (`uvicorn_config`): `limit_concurrency` (max_connections),
`timeout_keep_alive`, `h11_max_incomplete_event_size` (max_header_bytes), a listen `backlog` of twice
max_connections, and, for what it has no setting for, the protocol of connections.py (header_timeout, and a hard
bound of twice max_connections open). So the server holds at most about four times max_connections sockets
(open, being closed, waiting to be accepted), however many clients connect. Its logs, asyncio's and the app's are
rate-limited while it runs (logs.py).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from .connections import protocol_class
from .guards import LOOPBACK_HOSTS, check_allowed_hosts
from .limits import ServeLimits
from .logs import rate_limited_logs, report


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


def allowed_hosts_for(host: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The Host names a server listening on `host` answers to: the loopback names, `host` itself and `extra`
    (ValueError for a malformed one)."""
    return check_allowed_hosts([*LOOPBACK_HOSTS, host, *extra])


def uvicorn_config(app: FastAPI, limits: ServeLimits, log_level: str = "info", **options: Any):
    """The uvicorn.Config that serves `app` within `limits` (`options` are passed on, e.g. log_config)."""
    import uvicorn

    bound = 2 * limits.max_connections  # open connections, and connections waiting to be accepted
    return uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        ws="none",
        http=protocol_class(limits.header_timeout, bound),
        backlog=bound,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **options,
    )


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 7860,
    log_level: str = "info",
    sock: socket.socket | None = None,
    limits: ServeLimits | None = None,
) -> None:
    """Serve until interrupted (Ctrl+C / SIGTERM stop it gracefully). `limits`: by default the app's own."""
    import uvicorn

    served = getattr(app.state, "served", None)
    limits = limits or getattr(served, "limits", None) or ServeLimits()
    sock = sock or bind_socket(host, port)
    if not is_loopback(host):
        names = ", ".join(getattr(app.state, "allowed_hosts", LOOPBACK_HOSTS))
        print(
            f"binlat: warning: listening on {host}, which is not a loopback address: anyone who can reach "
            f"this machine can use the model (the API has no authentication); requests are served for the "
            f"Host names {names} (--allowed-host adds one)",
            file=sys.stderr,
            flush=True,
        )
    # /docs (Swagger) loads its scripts from a CDN and stays blank offline: point at what works without a network.
    print(f"binlat: serving on {url_of(sock)} (page at /, API schema at /openapi.json)", flush=True)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn_config(app, limits, log_level=log_level, host=bound_host, port=bound_port)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            report(limiter)  # now: after a SIGTERM, uvicorn re-raises it once run() is done, ending the process

    with rate_limited_logs() as limiter:
        Server(config).run(sockets=[sock])
