"""Every error path of the HTTP API (binlat.serve) and of `binlat serve`: a bad field, body or upload is a 4xx
with one JSON line saying what was wrong, an unexpected failure a 500 the server lives through, and bad
limits or a taken port one line on the command line."""

from __future__ import annotations

import base64
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from fastapi.testclient import TestClient

from binlat.serve import ServeLimits, bind_socket, create_app, is_loopback
from serve_support import (  # noqa: F401
    LIMITS,
    LOCAL,
    BrokenPipe,
    assert_error,
    client,
    huge_canvas_png,
    pipe,
    png_bytes,
    sample_image,
)


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
