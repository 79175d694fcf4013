"""Fault injection: a real `binlat serve` (a subprocess of `python -m binlat.cli`, HTTP only to 127.0.0.1) under a
burst of requests beyond its limits, with clients that vanish mid-request, stays healthy: the queue drains and
threads and memory return to baseline."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from faults_support import child_env

MAX_BODY = 65_536


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "Threads"):
            fields[name] = int(value.split()[0])
    return fields


def request(
    base: str, path: str, body: bytes | None = None, timeout: float = 60, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    req = urllib.request.Request(
        base + path, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def raw_send(port: int, data: bytes) -> None:
    """Send bytes on a fresh connection and hang up without reading anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)


def generate_body(i: int, steps: int = 2) -> bytes:
    return json.dumps({"prompt": f"shape number {i}", "steps": steps, "seed": i}).encode()


def http_post(body: bytes, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (
        f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + body


@pytest.fixture
def server(tmp_path):
    """`binlat serve` (random tiny model) as a subprocess on a free loopback port; yields (base url, pid)."""
    stderr = open(tmp_path / "server-stderr.txt", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "binlat.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-concurrent",
            "1",
            "--max-queue",
            "3",
            "--max-steps",
            "4",
            "--max-n",
            "2",
            "--max-body-bytes",
            str(MAX_BODY),
            "--log-level",
            "warning",
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        cwd=tmp_path,
    )
    try:
        line, deadline = b"", time.monotonic() + 120
        while b"serving on" not in line:
            assert proc.poll() is None, (tmp_path / "server-stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            if select.select([proc.stdout], [], [], 0.5)[0]:
                line = proc.stdout.readline()
        base = re.search(rb"(http://127\.0\.0\.1:\d+)", line).group(1).decode()
        assert base.startswith("http://127.0.0.1:")
        while True:  # the socket listens before uvicorn runs; wait for the first answer
            try:
                if request(base, "/healthz", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server never answered /healthz"
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        stderr.close()


def test_server_burst_with_disconnecting_clients_stays_healthy(server):
    base, pid = server
    port = int(base.rsplit(":", 1)[1])
    for i in range(3):  # warm-up: the worker thread, the text encoder and the allocator reach their steady state
        assert request(base, "/v1/generate", generate_body(i))[0] == 200
    time.sleep(0.5)
    baseline = proc_status(pid)

    answers: dict[str, list[tuple[int, dict]]] = {"normal": [], "oversize": [], "invalid": [], "health": []}
    errors: list[BaseException] = []
    lock = threading.Lock()
    actors = []

    def actor(kind: str, fn) -> None:
        actors.append((kind, fn))

    def record(kind: str, result) -> None:
        with lock:
            answers[kind].append(result)

    for i in range(14):
        actor("normal", lambda i=i: record("normal", request(base, "/v1/generate", generate_body(100 + i))))
    for i in range(4):
        actor(
            "oversize",
            lambda i=i: record(
                "oversize", request(base, "/v1/generate", json.dumps({"prompt": "x" * (MAX_BODY + 10 * i)}).encode())
            ),
        )
    for i in range(3):
        actor("invalid", lambda i=i: record("invalid", request(base, "/v1/generate", b'{"prompt": "x", "steps": 0}')))
    for i in range(4):  # half a body, then gone
        actor("half-body", lambda i=i: raw_send(port, http_post(b'{"prompt": "a ci', content_length=200)))
    for i in range(4):  # a whole request, then gone before the answer (its job still runs, or is refused)
        actor("no-read", lambda i=i: raw_send(port, http_post(generate_body(200 + i))))
    for i in range(3):  # half the headers, then gone
        actor("half-headers", lambda i=i: raw_send(port, b"POST /v1/generate HTTP/1.1\r\nHost: 127.0"))
    actor("health", lambda: (time.sleep(0.3), record("health", request(base, "/healthz", timeout=10))))

    # Two clients hang up right after asking: one job runs and one waits while the burst arrives, both orphaned.
    raw_send(port, http_post(generate_body(300, steps=4)))
    raw_send(port, http_post(generate_body(301, steps=4)))
    go = threading.Barrier(len(actors))

    def run(fn) -> None:
        try:
            go.wait(30)
            fn()
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for _, fn in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors, errors

    # Every request that waited for an answer got a clean one.
    normal = answers["normal"]
    assert len(normal) == 14 and {code for code, _ in normal} <= {200, 429}, [c for c, _ in normal]
    # Which ones were served and which turned away depends on timing (abandoned jobs hold queue places until
    # they finish); test_serve checks the 429 path deterministically, and the end of this test checks it still serves.
    for code, body in normal:
        assert (len(body["images"]) == 1) if code == 200 else ("busy" in body["error"] and "max_queue" in body["error"])
    assert [c for c, _ in answers["oversize"]] == [413] * 4
    assert all("max_body_bytes" in b["error"] for _, b in answers["oversize"])
    # A request with a body takes its queue place before its body is read (issue 29: memory stays bounded), so in
    # the burst an invalid one is turned away busy (429) or, once admitted, refused for its steps (422); test_serve
    # checks the 422 deterministically.
    assert len(answers["invalid"]) == 3
    for code, body in answers["invalid"]:
        assert ("steps" in body["error"]) if code == 422 else (code == 429 and "busy" in body["error"]), (code, body)
    assert answers["health"] and answers["health"][0][0] == 200  # answered during the burst

    # Back to idle: nothing admitted or running, no extra threads, memory back near its baseline.
    deadline = time.monotonic() + 30
    while True:
        health = request(base, "/healthz", timeout=10)[1]
        if health["admitted"] == 0 and health["running"] == 0:
            break
        assert time.monotonic() < deadline, f"work queue never drained: {health}"
        time.sleep(0.2)
    assert health["status"] == "ok"
    deadline = time.monotonic() + 15
    while (now := proc_status(pid))["Threads"] > baseline["Threads"]:
        assert time.monotonic() < deadline, f"threads {baseline['Threads']} -> {now['Threads']}"
        time.sleep(0.2)
    assert now["VmRSS"] - baseline["VmRSS"] < 50 * 1024, (baseline, now)  # kB
    # ... and it still serves.
    code, body = request(base, "/v1/generate", generate_body(999))
    assert code == 200 and len(body["images"]) == 1
