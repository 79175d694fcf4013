"""The reliability catalogue, server part (FastAPI TestClient over `create_app(random tiny pipeline, LIMITS)`).

Bad prompts, bodies, sizes, sampling settings, generators, fields and uploads sent to POST /v1/generate,
/v1/reconstruct and /v1/edit, and a body posted to a read-only route, are each a 4xx JSON {"error": ...} naming
the field, with nothing left admitted in the work queue. What every case asserts, Env and the fixtures:
tests/reliability_support.py.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from reliability_support import (  # noqa: F401
    LIMITS,
    LONG_PROMPT,
    Env,
    claimed_canvas_png,
    client,
    encoder,
    env,
    new_catalogue,
    noise_png,
    pipe,
    png_bytes,
)

CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# server


@case("server-empty-prompt", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": ""}), 422, "prompt: empty")


@case("server-whitespace-prompt", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompts": ["a cat", " \n\t"]}), 422, "prompts[1]: empty")


@case("server-prompt-100k-chars-refused", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/generate", json={"prompt": LONG_PROMPT}),
        422,
        "100000 characters",
        "limit of 1000 (max_prompt_chars)",
    )


@case("server-body-over-limit", "POST /v1/generate")
def _(env: Env) -> None:
    raw = json.dumps({"prompt": "x" * (LIMITS.max_body_bytes + 10)}).encode()
    env.server_fails(env.post_raw("/v1/generate", raw), 413, "max_body_bytes")


@case("server-invalid-utf8-body", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.post_raw("/v1/generate", b'{"prompt": "caf\xe9 \xff"}'), 400, "not UTF-8")


@case("server-lone-surrogate-escape-in-prompt", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.post_raw("/v1/generate", b'{"prompt": "caf\\ud800"}'), 422, "prompt: not valid Unicode text")


@case("server-size-not-a-multiple", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/generate", json={"prompt": "x", "size": 65}),
        422,
        "size:",
        "not supported by this tokenizer",
    )


@case("server-size-zero", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/generate", json={"prompt": "x", "size": [0, 64]}), 422, "size: 0x64 is not a positive size"
    )


SERVER_BAD_SAMPLING = [
    ("steps", "0"),
    ("steps", "-3"),
    ("steps", "NaN"),
    ("steps", "Infinity"),
    ("guidance_scale", "-1"),
    ("guidance_scale", "NaN"),
    ("guidance_scale", "Infinity"),
    ("temperature", "-0.5"),
    ("temperature", "NaN"),
    ("temperature", "-Infinity"),
    ("rho", "0"),
    ("rho", "-1"),
    ("rho", "NaN"),
    ("rho", "Infinity"),
]
for _field, _literal in SERVER_BAD_SAMPLING:

    @case(f"server-{_field}-{_literal}", "POST /v1/generate")
    def _(env: Env, field=_field, literal=_literal) -> None:
        raw = f'{{"prompt": "a cat", "{field}": {literal}}}'.encode()  # NaN/Infinity: Python's JSON extension
        env.server_fails(env.post_raw("/v1/generate", raw), 422, f"{field}:")


@case("server-unknown-generator", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "generator": "gan"}), 422, "generator:")


@case("server-unknown-field", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "cfg": 3}), 422, "cfg: unknown field")


@case("server-upload-zero-byte", "POST /v1/reconstruct")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/reconstruct", files={"image": ("a.png", b"", "image/png")}),
        422,
        "image: the uploaded file is empty",
    )


@case("server-upload-truncated", "POST /v1/reconstruct")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/reconstruct", files={"image": ("a.png", noise_png()[:3000], "image/png")}),
        422,
        "image:",
        "truncated",
    )


@case("server-upload-20000x20000-header", "POST /v1/reconstruct")
def _(env: Env) -> None:
    bomb = claimed_canvas_png(20_000, 20_000)
    env.server_fails(
        env.client.post("/v1/reconstruct", files={"image": ("bomb.png", bomb, "image/png")}),
        422,
        "image:",
        "400000000 pixels",
        "decompression bomb",
    )


@case("server-edit-strength-above-1", "POST /v1/edit")
def _(env: Env) -> None:
    image = png_bytes(Image.new("RGB", (64, 64), (220, 30, 30)))
    env.server_fails(
        env.client.post(
            "/v1/edit", files={"image": ("a.png", image, "image/png")}, data={"prompt": "a cat", "strength": "1.5"}
        ),
        422,
        "strength:",
    )


for _path in ("/", "/healthz", "/v1/models"):  # the read-only routes: the one wrong thing to send is a body

    @case(f"server-post-to-get-route-{_path.strip('/').replace('/', '-') or 'page'}", f"GET {_path}")
    def _(env: Env, path=_path) -> None:
        env.server_fails(env.client.post(path, json={"prompt": "a cat"}), 405, "Method Not Allowed")


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)
