"""Hostile-input catalogue, server part (issue 29, items 7 and 8): JSON nested too deep is a 400 (and the file
loaders refuse it, naming the file), and uploads must be PNG, JPEG or WebP: no other decoder, such as
Ghostscript for EPS, ever runs on a client's bytes."""

from __future__ import annotations

import base64
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from binlat.config import ConfigError, apply_overrides, load_config
from binlat.data.readers import ManifestDataset
from binlat.official import read_official_config
from binlat.pipeline import Pipeline
from binlat.tokenizer import BinaryTokenizer
from binlat.train.config import TrainConfig
from hostile_server_support import (  # noqa: F401
    assert_error,
    client,
    pipe,
)


def image_bytes(fmt: str, **save) -> bytes:
    image = Image.new("RGB", (48, 40), (230, 230, 230))
    image.paste((200, 30, 30), (8, 8, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [33, 5_000, 90_000])
def test_deeply_nested_json_is_a_400_not_a_500(client, depth) -> None:
    b64 = base64.b64encode(image_bytes("PNG")).decode()
    bodies = {
        "/v1/generate": f'{{"prompt": "x", "prompts": {nested(depth)}}}',
        "/v1/reconstruct": f'{{"image_base64": "{b64}", "size": {nested(depth)}}}',
        "/v1/edit": f'{{"image_base64": "{b64}", "prompt": {nested(depth)}}}',
    }
    for path, body in bodies.items():
        response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert_error(response, 400, "body: JSON nested deeper than 32 levels")
    assert client.get("/healthz").json()["admitted"] == 0


def test_nesting_within_the_limit_and_brackets_in_strings_are_judged_as_usual(client) -> None:
    ok = json.dumps({"prompt": "[" * 30 + "{" * 30 + '"\\', "steps": 1})  # 60 brackets inside a string
    assert client.post("/v1/generate", content=ok, headers={"content-type": "application/json"}).status_code == 200
    within = f'{{"prompt": "x", "prompts": {nested(31)}}}'  # 32 levels with the object: a type error, not depth
    assert_error(
        client.post("/v1/generate", content=within, headers={"content-type": "application/json"}), 422, "prompts"
    )
    for raw in ("[" * 150_000, '{"prompt": "x", "n": [1}'):
        response = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "error" in response.json()


def test_file_loaders_refuse_deep_json_naming_the_file(tmp_path) -> None:
    deep = "{" + '"model": ' + nested(100_000) + "}"
    (tmp_path / "train.json").write_text(deep)
    with pytest.raises(ConfigError, match=r"train\.json: JSON nested deeper than 64 levels"):
        load_config(TrainConfig, tmp_path / "train.json")
    with pytest.raises(ConfigError, match=r"--set model: JSON nested deeper"):
        apply_overrides({}, ["model=" + nested(3_000)])
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text(deep)
    with pytest.raises(ConfigError, match=r"config\.json: JSON nested deeper"):
        BinaryTokenizer.read_config(tmp_path / "tok")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "model_index.json").write_text(deep)
    with pytest.raises(ConfigError, match=r"model_index\.json: JSON nested deeper"):
        Pipeline.from_pretrained(tmp_path / "bundle")
    with pytest.raises(ConfigError, match=r"train\.json: JSON nested deeper"):
        read_official_config(tmp_path / "train.json")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "caption": "a cat"}\n{"path": ' + nested(5_000) + "}\n")
    with pytest.raises(ValueError, match=r"m\.jsonl line 2: JSON nested deeper"):
        ManifestDataset(tmp_path / "m.jsonl", transform=lambda image: image)


# --- uploads -----------------------------------------------------------------------------------------------
def test_uploads_are_png_jpeg_or_webp_only(client, monkeypatch) -> None:
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    for fmt in ("PNG", "JPEG", "WEBP"):
        r = client.post("/v1/reconstruct", files={"image": (f"a.{fmt}", image_bytes(fmt), "image/x")})
        assert r.status_code == 200, (fmt, r.text)
    eps = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
        b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n"
    )
    refused = {
        "EPS": eps,
        "TIFF": image_bytes("TIFF"),
        "BMP": image_bytes("BMP"),
        "GIF": image_bytes("GIF"),
        "PDF": image_bytes("PDF"),
        "ICO": image_bytes("ICO"),
        "PPM": image_bytes("PPM"),
    }
    for data in refused.values():
        assert_error(
            client.post("/v1/reconstruct", files={"image": ("a.png", data, "image/png")}),
            422,
            "not a recognised image format",
            "PNG, JPEG and WebP",
        )
        assert_error(
            client.post("/v1/edit", json={"image_base64": base64.b64encode(data).decode(), "prompt": "x"}),
            422,
            "PNG, JPEG and WebP",
        )
    assert not ran, "Ghostscript was run for an upload"
    assert client.get("/healthz").json()["admitted"] == 0
