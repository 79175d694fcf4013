"""The HTTP API (binlat.serve) over the random tiny model: every endpoint answers, and the model's tuned
sampling settings fill what a request leaves out."""

from __future__ import annotations

import base64
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from fastapi.testclient import TestClient

from binlat import editing
from binlat.pipeline import Pipeline
from binlat.serve import create_app
from serve_support import LIMITS, LOCAL, client, decode_png, pipe, png_bytes, sample_image  # noqa: F401


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
