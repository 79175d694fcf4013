"""The HTTP API (binlat.serve) over the random tiny model: every endpoint, every error path, and the bounded
queue under more simultaneous requests than it admits."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from binlat import editing
from binlat.pipeline import Pipeline
from binlat.serve import ServeLimits, bind_socket, create_app, is_loopback

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


# --- endpoints ----------------------------------------------------------------------------------------------
def test_health_models_docs_and_page(client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["generators"] == ["ar", "diffusion"] and models["image_size"] == 64
    assert (models["num_tokens"], models["num_bits"], models["trained"]) == (16, 32, False)
    assert models["limits"]["max_steps"] == 8
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/reconstruct", "/v1/edit", "/healthz", "/v1/models"} <= set(spec["paths"])
    assert "requestBody" in spec["paths"]["/v1/generate"]["post"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needle in (
        'id="prompt"',
        'id="generate"',
        'id="gallery"',
        'id="steps"',
        'id="guidance_scale"',
        'id="temperature"',
        'id="seed"',
        'id="size"',
        'id="n"',
        'id="protocol"',
        'id="generator"',
        'id="edit-form"',
        "download",
    ):
        assert needle in html, needle
    # Self-contained: no external scripts, styles or fonts.
    assert "<link" not in html and 'src="http' not in html and "@import" not in html


def test_generate_returns_seeded_pngs_with_metadata(client) -> None:
    body = {"prompt": "a red circle", "steps": 3, "seed": 7, "n": 2, "guidance_scale": 2.0, "temperature": 0.9}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["timing_s"] >= 0 and [im["seed"] for im in data["images"]] == [7, 8]
    first = data["images"][0]
    assert first["prompt"] == "a red circle" and first["num_steps"] == 3 and first["generator"] == "diffusion"
    assert (first["guidance_scale"], first["temperature"], first["protocol"]) == (2.0, 0.9, 1)
    assert decode_png(first["png_base64"]).size == (64, 64)
    again = client.post("/v1/generate", json=body | {"n": 1, "seed": 8}).json()
    assert again["images"][0]["png_base64"] == data["images"][1]["png_base64"]  # image i uses seed + i
    # num_steps is the field's name (as in Python and the metadata), steps its alias: the same image
    named = client.post("/v1/generate", json={k: v for k, v in body.items() if k != "steps"} | {"num_steps": 3, "n": 1})
    assert named.json()["images"][0]["png_base64"] == first["png_base64"]
    ar = client.post("/v1/generate", json=body | {"generator": "ar", "rho": 2.0, "protocol": 2}).json()["images"][0]
    assert (ar["generator"], ar["guidance_scale"], ar["temperature"]) == ("ar", 2.0, 0.9)
    assert not {"num_steps", "steps", "rho", "protocol"} & set(ar)  # AR reads none of them: not recorded as used


def test_generate_prompt_list_ar_and_sizes(client) -> None:
    r = client.post(
        "/v1/generate", json={"prompts": ["a cat", "a dog"], "generator": "ar", "seed": 1, "size": [32, 48]}
    )
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [im["prompt"] for im in images] == ["a cat", "a dog"] and "num_steps" not in images[0]
    assert decode_png(images[1]["png_base64"]).size == (48, 32)
    r = client.post("/v1/generate", json={"prompt": "x", "steps": 2, "size": "32x64", "protocol": 2})
    assert r.status_code == 200 and r.json()["images"][0]["width"] == 64


def test_reconstruct_multipart_and_json_agree(client, pipe) -> None:
    data = png_bytes(sample_image())
    multipart = client.post("/v1/reconstruct", files={"image": ("a.png", data, "image/png")})
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert (body["num_tokens"], body["num_bits"]) == (16, 32)
    expected = editing.reconstruct(pipe, sample_image())
    assert body["bits_hex"] == editing.pack_bits_hex(expected.bits[0]) and len(body["bits_hex"]) == 16 * 32 // 4
    assert decode_png(body["png_base64"]).size == (64, 64)
    as_json = client.post("/v1/reconstruct", json={"image_base64": base64.b64encode(data).decode()}).json()
    assert as_json["bits_hex"] == body["bits_hex"] and as_json["png_base64"] == body["png_base64"]
    bits = editing.unpack_bits_hex(body["bits_hex"], 16, 32)
    assert torch.equal(bits, expected.bits[0])


def test_edit_multipart_and_json(client) -> None:
    data = png_bytes(sample_image())
    r = client.post(
        "/v1/edit",
        files={"image": ("a.png", data, "image/png")},
        data={"prompt": "a blue square", "strength": "0.5", "steps": "3", "seed": "4", "n": "2"},
    )
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [im["seed"] for im in images] == [4, 5] and images[0]["strength"] == 0.5
    # strength 0 is the reconstruction itself.
    zero = client.post(
        "/v1/edit", json={"image_base64": base64.b64encode(data).decode(), "prompt": "x", "strength": 0, "seed": 1}
    )
    recon = client.post("/v1/reconstruct", files={"image": ("a.png", data, "image/png")})
    assert zero.status_code == 200, zero.text
    assert zero.json()["images"][0]["png_base64"] == recon.json()["png_base64"]


# --- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"prompt": "x", "generator": "gan"}, 422, "generator"),
        ({"prompt": "x", "steps": 0}, 422, "steps"),
        ({"prompt": "x", "steps": 9}, 422, "max_steps"),
        ({"prompt": "x", "steps": 2.5}, 422, "steps"),
        ({"prompt": "x", "steps": "3"}, 422, "steps"),
        ({"prompt": "x", "guidance_scale": "NaN"}, 422, "guidance_scale"),
        ({"prompt": "x", "temperature": "Infinity"}, 422, "temperature"),
        ({"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale"),
        ({"prompt": "x", "rho": 0}, 422, "rho"),
        ({"prompt": "x", "protocol": 3}, 422, "protocol"),
        ({"prompt": "x", "size": 100}, 422, "size"),
        ({"prompt": "x", "size": 256}, 422, "max_size"),
        ({"prompt": "x", "size": [64]}, 422, "size"),
        ({"prompt": "x", "size": "big"}, 422, "size"),
        ({"prompt": "x", "n": 5}, 422, "max_n"),
        ({"prompts": ["a", "b", "c"], "n": 2}, 422, "max_n"),
        ({"prompt": "x", "n": 0}, 422, "n"),
        ({"prompt": "x" * 65}, 422, "max_prompt_chars"),
        ({"prompt": "   "}, 422, "empty"),
        ({"prompts": []}, 422, "prompts"),
        ({"prompts": ["ok", ""]}, 422, "prompts[1]"),
        ({"prompts": ["ok", 3]}, 422, "prompts[1]"),
        ({}, 422, "prompt"),
        ({"prompt": "x", "prompts": ["y"]}, 422, "not both"),
        ({"prompt": "x", "seed": -1}, 422, "seed"),
        ({"prompt": "x", "seed": True}, 422, "seed"),
        ({"prompt": "x", "colour": "red"}, 422, "unknown field"),
        ({"prompt": 5}, 422, "prompt"),
    ],
)
def test_generate_rejects_bad_fields(client, body, status, needle) -> None:
    assert_error(client.post("/v1/generate", json=body), status, needle)


@pytest.mark.parametrize(
    "raw, ctype, status, needle",
    [
        (b"{bad json", "application/json", 400, "not valid JSON"),
        (b'{"prompt": "x", "guidance_scale": NaN}', "application/json", 422, "guidance_scale"),
        (b"[1, 2]", "application/json", 400, "object"),
        (b"", "application/json", 400, "empty"),
        (b"\xff\xfe", "application/json", 400, "UTF-8"),
        (b"prompt=x", "text/plain", 415, "application/json"),
    ],
)
def test_generate_rejects_bad_bodies(client, raw, ctype, status, needle) -> None:
    assert_error(client.post("/v1/generate", content=raw, headers={"content-type": ctype}), status, needle)


def test_body_size_limit_from_header_and_while_reading(client) -> None:
    big = json.dumps({"prompt": "x" * 150_000}).encode()
    assert_error(
        client.post("/v1/generate", content=big, headers={"content-type": "application/json"}), 413, "max_body_bytes"
    )

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b" " * 10_000

    assert_error(
        client.post("/v1/generate", content=chunked(), headers={"content-type": "application/json"}), 413, "too large"
    )
    upload = b"\x89PNG" + bytes(150_000)
    assert_error(client.post("/v1/reconstruct", files={"image": ("big.png", upload, "image/png")}), 413)
    assert client.get("/healthz").status_code == 200


def test_image_endpoints_reject_bad_uploads(client) -> None:
    good = png_bytes(sample_image())
    for path in ("/v1/reconstruct", "/v1/edit"):
        fields = {"prompt": "x"} if path == "/v1/edit" else {}
        assert_error(
            client.post(path, files={"image": ("a.txt", b"hello there", "text/plain")}, data=fields),
            422,
            "image",
            "not a recognised image",
        )
        assert_error(client.post(path, files={"image": ("a.png", b"", "image/png")}, data=fields), 422, "empty")
        assert_error(client.post(path, data=fields | {"other": "1"}, files={"x": ("a.png", good, "image/png")}), 422)
        assert_error(client.post(path, json=fields | {"image_base64": "%%%"}), 422, "base64")
        assert_error(client.post(path, json=fields), 422, "image_base64")
        assert_error(client.post(path, content=b"abc", headers={"content-type": "text/csv"}), 415)
    assert_error(client.post("/v1/reconstruct", files={"image": ("cut.png", good[:80], "image/png")}), 422, "truncated")
    assert_error(
        client.post("/v1/reconstruct", files={"image": ("huge.png", huge_canvas_png(), "image/png")}), 422, "pixels"
    )
    b64 = base64.b64encode(good).decode()
    assert_error(client.post("/v1/edit", json={"image_base64": b64, "prompt": "x", "strength": 1.5}), 422, "strength")
    assert_error(
        client.post(
            "/v1/edit", files={"image": ("a.png", good, "image/png")}, data={"prompt": "x", "guidance_scale": "nan"}
        ),
        422,
        "guidance_scale",
    )
    assert_error(
        client.post("/v1/edit", files={"image": ("a.png", good, "image/png")}, data={"prompt": "x", "steps": "lots"}),
        422,
        "steps",
    )
    assert_error(client.post("/v1/edit", json={"image_base64": b64, "prompt": ""}), 422, "empty")
    assert_error(client.post("/v1/edit", json={"image_base64": b64}), 422, "prompt")
    assert_error(client.post("/v1/reconstruct", json={"image_base64": b64, "size": 72}), 422, "size")


def test_unknown_routes_and_methods_are_json(client) -> None:
    assert_error(client.get("/v2/nothing"), 404, "not found")
    assert_error(client.get("/v1/generate"), 405)


class BrokenPipe:
    """Delegates to a real pipeline but fails inside generation, like an unexpected bug would."""

    def __init__(self, pipe: Pipeline):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("simulated failure deep in the model")


def test_unexpected_exception_is_a_500_json_and_the_server_lives(pipe) -> None:
    with TestClient(create_app(BrokenPipe(pipe), LIMITS), base_url=LOCAL) as c:
        assert_error(c.post("/v1/generate", json={"prompt": "x", "steps": 1}), 500, "internal error")
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["admitted"] == 0
        ok = c.post("/v1/reconstruct", files={"image": ("a.png", png_bytes(sample_image()), "image/png")})
        assert ok.status_code == 200


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        ServeLimits(max_concurrent=4, max_queue=2)
    with pytest.raises(ValueError, match="max_n"):
        ServeLimits(max_n=0)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


# --- concurrency --------------------------------------------------------------------------------------------
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


# --- the command --------------------------------------------------------------------------------------------
def test_serve_command_errors_are_one_line(capsys) -> None:
    from binlat.cli import main

    def run(*argv) -> int:
        try:
            return main([str(a) for a in argv])
        except SystemExit as e:
            return e.code

    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert run("serve", "--port", port) == 1  # fails before any model is loaded
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
    finally:
        taken.close()
    assert run("serve", "--max-concurrent", 3, "--max-queue", 2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_queue" in err
    assert run("serve", "--max-n", 0) == 2
    assert "max n" in capsys.readouterr().err


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


def test_model_sampling_defaults_fill_what_a_request_leaves_out(pipe) -> None:
    import dataclasses

    tuned = Pipeline(
        pipe.tokenizer,
        pipe.text_encoder,
        config=dataclasses.replace(pipe.config, sampling={"diffusion": {"guidance_scale": 2.5, "num_steps": 3}}),
        **pipe.generators,
    )
    with TestClient(create_app(tuned, LIMITS), base_url=LOCAL) as c:
        info = c.get("/v1/models").json()
        assert info["sampling"]["diffusion"]["guidance_scale"] == 2.5
        assert info["sampling"]["ar"]["guidance_scale"] == 7.5  # built-in where the model sets nothing
        left_out = c.post("/v1/generate", json={"prompt": "a red circle", "seed": 3}).json()["images"][0]
        assert (left_out["guidance_scale"], left_out["num_steps"]) == (2.5, 3)
        given = c.post(
            "/v1/generate", json={"prompt": "a red circle", "seed": 3, "guidance_scale": 2.5, "steps": 3}
        ).json()["images"][0]
        assert given["png_base64"] == left_out["png_base64"]
        other = c.post("/v1/generate", json={"prompt": "a red circle", "seed": 3, "guidance_scale": 0.0}).json()
        assert other["images"][0]["guidance_scale"] == 0.0
        # An edit at strength 1 with the settings left out is the same image as generation left out.
        b64 = base64.b64encode(png_bytes(sample_image())).decode()
        edited = c.post(
            "/v1/edit", json={"image_base64": b64, "prompt": "a red circle", "strength": 1.0, "seed": 3}
        ).json()["images"][0]
        assert (edited["guidance_scale"], edited["num_steps"]) == (2.5, 3)
        assert edited["png_base64"] == left_out["png_base64"]


@pytest.mark.parametrize(
    "headers", [{"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}, {"origin": "null"}]
)
@pytest.mark.parametrize(
    "body",
    [
        {"content": b'{"prompt": "a red circle"}'},  # JSON with no Content-Type
        {"content": b"prompt=x", "ctype": "application/x-www-form-urlencoded"},
        {"content": b"--b--\r\n", "ctype": "multipart/form-data; boundary=b"},
    ],
)
def test_a_browser_request_from_another_site_is_refused(client, headers, body) -> None:
    """Another site's page may POST "simple" requests here without the user's say; they are refused before any
    body is read, whatever the endpoint."""
    sent = dict(headers, **({"content-type": body["ctype"]} if "ctype" in body else {}))
    for path in ("/v1/generate", "/v1/reconstruct", "/v1/edit"):
        assert_error(client.post(path, content=body["content"], headers=sent), 403, "cross-site request refused")


def test_same_origin_and_non_browser_requests_are_served(client) -> None:
    request = {"prompt": "a red circle", "steps": 1, "seed": 0}
    for headers in ({}, {"origin": LOCAL, "sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"}):
        response = client.post("/v1/generate", json=request, headers=headers)
        assert response.status_code == 200, (headers, response.text)
