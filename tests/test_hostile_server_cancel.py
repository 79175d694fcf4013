"""Hostile-input catalogue, server part (issue 29, item 8): the work queue's tickets hold places and free them
when cancelled, and a client that disconnects cancels its work (queued: dropped; running: stopped at the next
step), on the real server on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from binlat.pipeline import Pipeline
from binlat.serve import ApiError, ServeLimits, WorkQueue, create_app
from binlat.serve.errors import ClientGone
from binlat.serve.workqueue import cancellable
from hostile_server_support import (  # noqa: F401
    connect,
    generate_request,
    get,
    live_server,
    pipe,
    read_response,
    wait_for,
)


def test_tickets_hold_places_and_cancelling_frees_them() -> None:
    queue = WorkQueue(max_concurrent=1, max_queue=2)
    try:
        first, second = queue.admit(), queue.admit()
        with pytest.raises(ApiError, match="busy") as e:
            queue.admit()
        assert e.value.status == 429
        second.release()
        second.release()  # once only
        assert queue.admitted == 1
        gate = threading.Event()
        running = queue.submit(gate.wait, first)
        waiting = queue.admit()
        queue.submit(lambda: pytest.fail("dropped work ran"), waiting)
        assert queue.admitted == 2
        waiting.cancel()  # not started: dropped at once
        assert queue.admitted == 1
        gate.set()
        running.result(5)
        assert (queue.admitted, queue.running) == (0, 0)
        # Running work stops at the next forward call of a cancellable network.
        net, calls = cancellable(torch.nn.Linear(2, 2)), []

        def steps() -> None:
            for _ in range(200):
                calls.append(net(torch.zeros(1, 2)))
                time.sleep(0.01)

        ticket = queue.admit()
        future = queue.submit(steps, ticket)
        while len(calls) < 3:
            time.sleep(0.01)
        ticket.cancel()
        with pytest.raises(ClientGone):
            future.result(5)
        assert len(calls) < 20 and queue.admitted == 0
        net(torch.zeros(1, 2))  # outside the queue's threads the hook does nothing
    finally:
        queue.shutdown()


class RecordingPipe:
    """The real pipeline, recording the prompts each generation was asked for."""

    def __init__(self, pipe: Pipeline):
        self._pipe, self.asked = pipe, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompts, *args, **kwargs):
        self.asked.append(list(prompts))
        return self._pipe(prompts, *args, **kwargs)


def test_a_client_that_disconnects_cancels_its_work(pipe) -> None:
    recording = RecordingPipe(pipe)
    limits = ServeLimits(max_concurrent=1, max_queue=3, max_steps=100, header_timeout=5, body_timeout=5)
    calls: list[int] = []

    def one_slow_step(*_) -> None:
        calls.append(1)
        time.sleep(0.05)

    slow = pipe.generators["diffusion"].register_forward_pre_hook(one_slow_step)
    try:
        with live_server(create_app(recording, limits)) as port:
            health = lambda: get(port, "/healthz")[1]  # noqa: E731
            running, waiting = connect(port), connect(port)
            running.sendall(generate_request("first", 100))
            wait_for(lambda: len(calls) >= 5, 30, "the first generation to start")
            waiting.sendall(generate_request("second", 100))
            wait_for(lambda: health()["admitted"] == 2, 5, "the second request to be queued")
            waiting.close()  # waiting: dropped, its place freed at once
            wait_for(lambda: health()["admitted"] == 1, 5, "the queued request to be dropped")
            assert health()["running"] == 1
            before = len(calls)
            running.close()  # running: stops at the next step
            wait_for(lambda: health() == {**health(), "admitted": 0, "running": 0}, 5, "the running one to stop")
            assert len(calls) - before <= 10 and len(calls) < 60, (before, len(calls))  # of 100 steps asked
            assert recording.asked == [["first"]]  # the dropped request never reached the model
            slow.remove()
            with connect(port) as again:
                again.sendall(generate_request("third", 2))
                assert read_response(again)[0] == 200
    finally:
        slow.remove()
