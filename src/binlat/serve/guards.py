"""The middlewares that refuse a request before any route sees it, outermost first.

- `HostAllowListMiddleware`: the Host header must name this server (Starlette's TrustedHostMiddleware matches
  it). A page on another site whose name an attacker points at 127.0.0.1 (DNS rebinding) is same-origin to the
  browser, but its requests carry the attacker's name as Host, so they are refused.
- `SameOriginMiddleware`: a POST that a browser makes for another site's page is refused; the page's origin
  must be this Host and on the same allow-list.
- `AdmissionMiddleware`: a request with a body takes its place in the work queue (or gets 429) before any of the
  body is read; the body is then read as it arrives, bounded in size (413) and in time (408). While the request
  waits or runs, a client that disconnects cancels it (workqueue.Ticket).

Every refusal is this API's JSON `{"error": ...}`; one that leaves a body unread also closes the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.middleware.trustedhost import TrustedHostMiddleware

from .errors import ApiError, error_response
from .workqueue import WorkQueue

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
TICKET = "binlat.ticket"  # scope key: the request's workqueue.Ticket, for the route that submits its work
CLOSE = {"Connection": "close"}
_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9_.-]+|\[[0-9a-f:.%a-z]+\]")


def host_name(name: str) -> str:
    """A host name or address as a Host header carries it (without the port): lower case, IPv6 in brackets.
    ValueError for a name with a port."""
    name = name.strip().lower()
    if ":" in name and not name.startswith("["):
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ValueError(f"{name!r} is not a host name or address (give it without a port)") from None
        return f"[{name}]"
    return name


def check_allowed_hosts(names: Sequence[str]) -> tuple[str, ...]:
    """The allow-list as Host patterns: a name or address, "*.domain" for its subdomains, or "*" for any host.
    ValueError for anything else."""
    out = []
    for name in names:
        try:
            pattern = host_name(name)
        except ValueError as e:
            raise ValueError(f"allowed host {e}") from None
        if not _PATTERN.fullmatch(pattern):
            raise ValueError(f"allowed host {name!r} is not a host name, an address, '*.domain' or '*'")
        out.append(pattern)
    return tuple(dict.fromkeys(out))


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether `host` (no port) matches the allow-list, as TrustedHostMiddleware matches it."""
    host = host.lower()
    return any(p == "*" or host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in allowed)


def _header(scope, name: bytes) -> str:
    return dict(scope.get("headers") or []).get(name, b"").decode("latin-1")


class HostAllowListMiddleware:
    """Answer 400 to a request whose Host header is not on `allowed_hosts` (see check_allowed_hosts)."""

    def __init__(self, app, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS):
        self.app, self.allowed = app, check_allowed_hosts(allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def passed(scope, receive, _send) -> None:
            await self.app(scope, receive, send)

        async def refused(message) -> None:  # TrustedHostMiddleware's own plain-text refusal: answer JSON instead
            if message["type"] == "http.response.start":
                host = _header(scope, b"host")
                shown = repr(host[:100]) if host else "(none)"
                await error_response(
                    400,
                    f"Host {shown} is not allowed: this server answers to "
                    f"{', '.join(self.allowed)} (binlat serve --allowed-host NAME adds a name)",
                    headers=CLOSE,
                )(scope, receive, send)

        check = TrustedHostMiddleware(passed, allowed_hosts=list(self.allowed), www_redirect=False)
        await check(scope, receive, refused)


class SameOriginMiddleware:
    """Refuse (403) a POST that a browser makes for a page of another site. Such a page can send a "simple"
    request (form fields, text/plain, or JSON without a Content-Type) without the user's say; the server would run
    it. Browsers name the page's origin (`Origin`) and say whether the request is cross-site (`Sec-Fetch-Site`);
    clients that are not browsers send neither and are unaffected. An origin must be this request's Host and on the
    host allow-list."""

    def __init__(self, app, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS):
        self.app, self.allowed = app, check_allowed_hosts(allowed_hosts)

    def _foreign(self, origin: str, host: str) -> bool:
        if origin in ("", "null"):
            return origin == "null"
        try:
            parts = urlsplit(origin)
            return parts.netloc.lower() != host or not host_allowed(host_name(parts.hostname or ""), self.allowed)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            return True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            site = _header(scope, b"sec-fetch-site").lower()
            origin = _header(scope, b"origin")
            if site == "cross-site" or self._foreign(origin, _header(scope, b"host").lower()):
                response = error_response(
                    403,
                    f"cross-site request refused (Origin {origin or '-'}, Sec-Fetch-Site "
                    f"{site or '-'}): call the API from its own page or without a browser",
                    headers=CLOSE,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AdmissionMiddleware:
    """For a request with a body: a work-queue place first (429 when full), then the body, read as it arrives and
    refused once over `max_bytes` (413; at once when Content-Length says so) or not complete within `timeout`
    seconds (408). The app then gets the body from memory and the ticket under scope[TICKET]; a disconnect of the
    client cancels the ticket. The place is given back when the request ends, unless its work still runs."""

    def __init__(self, app, queue: WorkQueue, max_bytes: int, timeout: float):
        self.app, self.queue, self.max_bytes, self.timeout = app, queue, max_bytes, timeout

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        length = headers.get(b"content-length")
        if (length is None or length.strip() == b"0") and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body (or not http): nothing to admit or read
            return
        refuse = functools.partial(_refuse, scope, receive, send)
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await refuse(400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await refuse(413, self._too_large(f"{declared} bytes"))
                return
        try:
            ticket = self.queue.admit()
        except ApiError as e:
            await refuse(e.status, e.message, e.headers)
            return
        try:
            chunks, refusal = await self._read(receive)
            if refusal is not None:
                await refuse(*refusal)
            elif chunks is not None:
                await self._run(scope, receive, send, chunks, ticket)
        finally:
            ticket.release_unless_submitted()

    async def _read(self, receive) -> tuple[collections.deque[bytes] | None, tuple[int, str] | None]:
        """(the body's chunks, None), or (None, (status, message)) to refuse it, or (None, None) when the client
        has gone."""
        chunks: collections.deque[bytes] = collections.deque()
        total = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, None
                    body = message.get("body", b"")
                    total += len(body)
                    if total > self.max_bytes:
                        return None, (413, self._too_large("more"))
                    chunks.append(body)
                    if not message.get("more_body", False):
                        return chunks, None
        except TimeoutError:
            return None, (
                408,
                f"request body not complete after {self.timeout:g} s (body_timeout): send the whole body promptly",
            )

    async def _run(self, scope, receive, send, chunks: collections.deque[bytes], ticket) -> None:
        gone = asyncio.Event()

        async def replay() -> dict:
            if chunks:
                body = chunks.popleft()
                return {"type": "http.request", "body": body, "more_body": bool(chunks)}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:  # after the body, the server's receive() answers only a disconnect
            with contextlib.suppress(Exception):
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                ticket.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.app({**scope, TICKET: ticket}, replay, send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    def _too_large(self, size: str) -> str:
        return (
            f"request body too large: {size} sent, this server accepts at most {self.max_bytes} bytes (max_body_bytes)"
        )


async def _refuse(scope, receive, send, status: int, message: str, headers: dict | None = None) -> None:
    await error_response(status, message, headers={**(headers or {}), **CLOSE})(scope, receive, send)
