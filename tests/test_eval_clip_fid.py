"""`binlat eval clip-score` and `binlat eval fid`: without local weights each fails in one line; their math is
checked with tiny stand-in networks (FID on stand-in features, CLIP score with a tiny CLIP)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from binlat.eval.features import frechet_distance, list_images, run_fid
from binlat.eval.report import REPORT_KEYS
from eval_support import assert_one_line, assert_tables_printed, run_cli

# ---------------------------------------------------------------- CLIP score and FID


def _write_images(folder: Path, n: int, seed: int, size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(p)
        paths.append(p)
    return paths


def test_clip_score_and_fid_without_weights_fail_in_one_line(tmp_path, capsys) -> None:
    _write_images(tmp_path / "a", 3, 0)
    _write_images(tmp_path / "b", 3, 1)
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo squares\na cat\n")
    code, _, err = run_cli(
        capsys,
        "eval",
        "clip-score",
        "--images",
        tmp_path / "a",
        "--prompts",
        tmp_path / "prompts.txt",
        "--out",
        tmp_path,
    )
    assert code == 1
    assert_one_line(err, "--clip-model", "nothing is downloaded")
    code, _, err = run_cli(
        capsys,
        "eval",
        "clip-score",
        "--images",
        tmp_path / "a",
        "--prompts",
        tmp_path / "prompts.txt",
        "--clip-model",
        tmp_path / "no-clip",
        "--out",
        tmp_path,
    )
    assert code == 1
    assert_one_line(err, "no-clip", "does not exist")
    code, _, err = run_cli(capsys, "eval", "fid", "--real", tmp_path / "a", "--fake", tmp_path / "b", "--out", tmp_path)
    assert code == 1
    assert_one_line(err, "--inception-weights", "nothing is downloaded")
    code, _, err = run_cli(
        capsys,
        "eval",
        "fid",
        "--real",
        tmp_path / "a",
        "--fake",
        tmp_path / "b",
        "--inception-weights",
        tmp_path / "none.pth",
        "--out",
        tmp_path,
    )
    assert code == 1
    assert_one_line(err, "none.pth does not exist")
    code, _, err = run_cli(
        capsys,
        "eval",
        "clip-score",
        "--images",
        tmp_path / "a",
        "--prompts",
        tmp_path / "missing.txt",
        "--out",
        tmp_path,
    )
    assert code == 1
    assert_one_line(err, "missing.txt")


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net standing in for Inception: uint8 [N, 3, H, W] -> [N, 6]."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 6, 3, stride=2),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x.float())


def test_fid_math_with_stand_in_features(tmp_path) -> None:
    pytest.importorskip("torchmetrics")
    real = _write_images(tmp_path / "real", 24, 0)
    other = _write_images(tmp_path / "other", 24, 1)
    # darker images: a different distribution
    shifted = tmp_path / "dark"
    shifted.mkdir()
    for p in real:
        Image.fromarray((np.asarray(Image.open(p)) // 3).astype(np.uint8)).save(shifted / p.name)
    net = TinyFeatures().eval()
    same = frechet_distance(real, list(real), net, batch_size=5)
    assert abs(same) < 1e-3
    near = frechet_distance(real, other, net)
    far = frechet_distance(real, list_images(shifted), net)
    assert far > 10 * near and near > 0
    report = run_fid(tmp_path / "real", shifted, out=tmp_path, feature=net)
    assert report["summary"]["fid"] == pytest.approx(far, rel=1e-6)
    on_disk = json.loads((tmp_path / "report-fid.json").read_text())
    assert tuple(on_disk) == REPORT_KEYS and on_disk["summary"]["num_real"] == 24


def _tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP with a byte-level vocabulary, saved like a Hub model."""
    transformers = pytest.importorskip("transformers")
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    try:
        tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = transformers.CLIPProcessor(image_processor=images, tokenizer=tok)
        text = dict(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        torch.manual_seed(0)
        model = transformers.CLIPModel(
            transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        )
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - a transformers release that builds tokenizers differently
        pytest.skip(f"cannot build a tiny CLIP with this transformers: {e}")
    return folder


def test_clip_score_math_with_tiny_clip(tmp_path, capsys) -> None:
    pytest.importorskip("torchmetrics")
    clip = _tiny_clip(tmp_path / "clip")
    paths = _write_images(tmp_path / "imgs", 3, 0)
    prompts = ["a red circle", "two squares", "a blue triangle above a green circle"]
    with open(tmp_path / "imgs" / "metadata.jsonl", "w") as f:
        for p, t in zip(paths, prompts):
            f.write(json.dumps({"file": p.name, "prompt": t, "seed": 0}) + "\n")
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "clip-score",
        "--images",
        tmp_path / "imgs",
        "--clip-model",
        clip,
        "--batch-size",
        2,
        "--out",
        tmp_path,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "report-clip-score.json").read_text())
    assert_tables_printed(report, stdout)
    # Each score is 100 x cosine of the model's own embeddings; the metric is their mean (floored at 0).
    from binlat.eval.features import load_clip

    model, processor = load_clip(clip)
    with torch.no_grad():
        batch = processor(
            text=prompts, images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt", padding=True
        )
        out = model(**batch)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    want = (100 * (img * txt).sum(-1)).tolist()
    got = [it["clip_score"] for it in report["items"]]
    assert got == pytest.approx(want, abs=1e-3)
    assert len(set(round(g, 4) for g in got)) == 3
    assert report["summary"]["clip_score"] == pytest.approx(max(float(np.mean(want)), 0.0), abs=1e-3)
