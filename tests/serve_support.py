"""What the test_serve_* files share: the random tiny model behind a TestClient with small limits, images to
upload, a pipeline that fails inside generation, and the check of the API's one-line JSON errors."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from binlat.pipeline import Pipeline
from binlat.serve import ServeLimits, create_app

LOCAL = "http://localhost"  # the server answers only to loopback Host names (TestClient's own is "testserver")
LIMITS = ServeLimits(
    max_concurrent=1, max_queue=4, max_body_bytes=100_000, max_n=4, max_steps=8, max_prompt_chars=64, max_size=128
)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.random_tiny()


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, LIMITS), base_url=LOCAL) as c:
        yield c


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_image() -> Image.Image:
    image = Image.new("RGB", (90, 70), (240, 240, 240))
    image.paste((200, 20, 20), (10, 10, 50, 50))
    return image


def huge_canvas_png(side: int = 5000) -> bytes:
    """A tiny file whose header claims a side x side RGB canvas (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def assert_error(response, status: int, *needles: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    for needle in needles:
        assert needle in body["error"], (needle, body["error"])
    return body["error"]


class BrokenPipe:
    """Delegates to a real pipeline but fails inside generation, like an unexpected bug would."""

    def __init__(self, pipe: Pipeline):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("simulated failure deep in the model")
