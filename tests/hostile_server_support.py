"""Helpers for the test_hostile_server_* files: the random tiny model behind a TestClient with small limits, the
real server on 127.0.0.1 (in a thread, or in a subprocess under a memory or file-descriptor cap) and raw-socket
clients that can stall, dribble or vanish as a hostile one would."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import binlat
from binlat.serve import ServeLimits, create_app
from serve_support import LOCAL, pipe  # noqa: F401  (pipe: a fixture the tests use)

SRC = str(Path(binlat.__file__).resolve().parents[1])


def connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def request_head(method: str, path: str, length: int | None = None, host: str = "localhost") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], object]:
    """(status, headers in lower case, the JSON body or else the text) of the next response on `sock`."""
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    response.begin()
    raw = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    body = json.loads(raw) if headers.get("content-type", "").startswith("application/json") else raw.decode()
    return response.status, headers, body


def get(port: int, path: str) -> tuple[int, object]:
    """(status, body) of a plain GET on a fresh connection."""
    with connect(port) as sock:
        sock.sendall(request_head("GET", path))
        status, _, body = read_response(sock)
    return status, body


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (anything it sends first is read and dropped)."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


@contextlib.contextmanager
def live_server(app) -> Iterator[int]:
    """The app served by uvicorn as `binlat serve` configures it (runner.uvicorn_config with the app's limits), in
    a thread, on an ephemeral port; yields the port and stops the server afterwards."""
    import uvicorn

    from binlat.serve import bind_socket, uvicorn_config

    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn_config(app, app.state.served.limits, log_level="warning", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive(), "server did not stop"


SERVER_SCRIPT = r'''
import json, os, resource, sys
from binlat.serve import ServeLimits, bind_socket, create_app, serve

class NoModel:
    """The connection-level cases never reach the model."""

limits = ServeLimits(**json.loads(sys.argv[1]))
extra_fds, extra_mb = json.loads(sys.argv[2])
app = create_app(NoModel(), limits)
sock = bind_socket("127.0.0.1", 0)
if extra_fds:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + extra_fds, hard))
if extra_mb:
    size_kb = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize:")).split()[1])
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + extra_mb * 2**20, hard))
serve(app, "127.0.0.1", sock=sock, log_level="warning")
'''


class ServerProcess:
    """`binlat.serve.serve` in a subprocess; a sampler thread tracks its peak resident memory and open descriptors."""

    def __init__(self, tmp: Path, limits: dict, extra_fds: int | None, extra_address_space_mb: int | None):
        (tmp / "server.py").write_text(SERVER_SCRIPT)
        self.out, self.err = tmp / "server.out", tmp / "server.err"
        env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(tmp / "server.py"),
                    json.dumps(limits),
                    json.dumps([extra_fds, extra_address_space_mb]),
                ],
                stdout=out,
                stderr=err,
                env=env,
            )
        self.port = self._wait_for_port()
        time.sleep(0.2)
        self.base_fds, self.base_rss = self._fds(), self._rss()
        self._peak_fds, self._peak_rss = self.base_fds, self.base_rss
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.out.read_text().splitlines():
                if "serving on http://127.0.0.1:" in line:
                    return int(line.split("127.0.0.1:")[1].split()[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"server did not start: {self.err.read_text()[-3000:]}")

    def _fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def _rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError, StopIteration, ValueError):
                self._peak_fds = max(self._peak_fds, self._fds())
                self._peak_rss = max(self._peak_rss, self._rss())

    def peak_fds(self) -> int:
        return self._peak_fds

    def peak_rss(self) -> int:
        return self._peak_rss

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            self._sampler.join(5)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a graceful stop: the log summary is written then
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def subprocess_server(
    tmp: Path, limits: dict, extra_fds: int | None = None, extra_address_space_mb: int | None = None
) -> Iterator[ServerProcess]:
    """A server with these ServeLimits fields in a subprocess, allowed `extra_fds` descriptors and
    `extra_address_space_mb` MB of address space beyond what it holds once started; stopped afterwards."""
    server = ServerProcess(tmp, limits, extra_fds, extra_address_space_mb)
    try:
        yield server
    finally:
        server.stop()
    assert server.proc.returncode is not None


def connect_many(port: int, count: int, within: float) -> list[socket.socket]:
    """`count` connections opened at once (non-blocking connects, so a full listen queue delays them all together,
    not one after another); those established within `within` seconds, in blocking mode."""
    pending = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        pending.append(sock)
    done, deadline = [], time.monotonic() + within
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
        for sock in writable:
            pending.remove(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                sock.setblocking(True)
                done.append(sock)
            else:
                sock.close()
    for sock in pending:
        sock.close()
    return done


# --- in-process: the tiny model behind a TestClient -------------------------------------------------------------------
# The same tiny model and Host as the serve tests (serve_support), with a larger body limit.
LIMITS = ServeLimits(
    max_concurrent=1, max_queue=4, max_body_bytes=200_000, max_n=4, max_steps=8, max_prompt_chars=64, max_size=128
)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, LIMITS), base_url=LOCAL) as c:
        yield c


def assert_error(response, status: int, *needles: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    for needle in needles:
        assert needle in body["error"], (needle, body["error"])
    return body["error"]


def generate_request(prompt: str, steps: int) -> bytes:
    body = json.dumps({"prompt": prompt, "steps": steps, "seed": 1}).encode()
    return request_head("POST", "/v1/generate", len(body)) + body


def wait_for(condition, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
