"""The HTTP API (binlat.serve) under more simultaneous requests than it admits: the bounded queue answers
every one (200 or 429) and never runs more at once than max_concurrent; several workers share one pipeline."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient

from binlat.pipeline import Pipeline
from binlat.serve import ServeLimits, bind_socket, create_app
from serve_support import LOCAL, BrokenPipe, pipe  # noqa: F401


class SlowPipe(BrokenPipe):
    """A real pipeline that takes at least `delay` seconds per call and records how many calls overlap."""

    def __init__(self, pipe: Pipeline, delay: float):
        super().__init__(pipe)
        self.delay, self.active, self.peak = delay, 0, 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.delay)
            return self._pipe(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


def test_bounded_queue_answers_every_request(pipe) -> None:
    import uvicorn

    slow = SlowPipe(pipe, delay=0.4)
    limits = ServeLimits(max_concurrent=1, max_queue=3, max_n=2, max_steps=4)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(slow, limits), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

        results: list[tuple[int, dict]] = []
        go = threading.Barrier(10)

        def fire(i: int) -> None:
            body = json.dumps({"prompt": f"shape {i}", "steps": 1, "seed": i}).encode()
            request = urllib.request.Request(
                f"{base}/v1/generate", data=body, headers={"Content-Type": "application/json"}
            )
            go.wait()
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    results.append((r.status, json.loads(r.read())))
            except urllib.error.HTTPError as e:
                results.append((e.code, json.loads(e.read())))

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert len(results) == 10, "some request got no answer"
        statuses = sorted(code for code, _ in results)
        assert set(statuses) <= {200, 429}, statuses
        assert 1 <= statuses.count(200) and statuses.count(429) >= 1, statuses
        for code, body in results:
            if code == 429:
                assert "busy" in body["error"]
            else:
                assert len(body["images"]) == 1
        assert slow.peak == 1  # never more generations at once than max_concurrent
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
            health = json.loads(r.read())
        assert health["status"] == "ok" and health["admitted"] == 0 and health["running"] == 0
        # Capacity is back: a request after the burst succeeds.
        request = urllib.request.Request(
            f"{base}/v1/generate", data=b'{"prompt": "after", "steps": 1}', headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive()


def test_several_workers_share_one_pipeline(pipe) -> None:
    """With max_concurrent > 1, simultaneous requests run side by side (text encoding is serialised)."""
    limits = ServeLimits(max_concurrent=2, max_queue=6, max_steps=4)
    with TestClient(create_app(pipe, limits), base_url=LOCAL) as c:
        codes: list[int] = []

        def fire(i: int) -> None:
            r = c.post("/v1/generate", json={"prompts": [f"shape {i}", "a circle"], "steps": 2, "seed": i})
            codes.append(r.status_code)

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [200] * 4
        reference = c.post("/v1/generate", json={"prompt": "shape 2", "steps": 2, "seed": 2}).json()
        again = c.post("/v1/generate", json={"prompts": ["shape 2", "a circle"], "steps": 2, "seed": 2}).json()
        assert again["images"][0]["png_base64"] == reference["images"][0]["png_base64"]
