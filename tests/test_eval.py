"""`binlat eval`: the shapes benchmark (accepts correct images, rejects wrong ones), the pixel metrics (binlat.metrics)
and the codec byte-budget search, reports and tables, and the clear one-line failures of CLIP score and FID without
local weights (their math checked with tiny stand-in networks)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import binlat.eval.reconstruction as rec
import binlat.metrics as metrics
from binlat.cli import main
from binlat.data.shapes import CATEGORIES, HELD_OUT, PALETTE, render, scene_for_caption, to_tensor
from binlat.eval.features import frechet_distance, list_images, run_fid
from binlat.eval.report import REPORT_KEYS, format_value, parse_table, render_table
from binlat.eval.shapes_eval import SHEET_NAME, run_shapes
from binlat.judge.accuracy import HELD_OUT_CATEGORIES, evaluate_shapes
from binlat.pipeline import Pipeline, PipelineOutput, check_prompts


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def assert_tables_printed(report: dict, stdout: str) -> None:
    """Every table in the JSON is printed verbatim."""
    for table in report["tables"]:
        assert render_table(table) in stdout


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return Pipeline.random_tiny().save_pretrained(tmp_path_factory.mktemp("bundle") / "tiny")


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_ssim_identical_images() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 24, 20), generator=g, dtype=torch.uint8)
    assert (metrics.psnr(a, a.clone()) == metrics.PSNR_CAP_DB).all()  # capped, so a mean over images stays finite
    one_off = a.clone()
    one_off[0, 0, 0, 0] ^= 1  # one grey level in one channel of one pixel: the largest finite PSNR, under the cap
    assert math.isfinite(metrics.psnr(a, one_off)[0]) and metrics.psnr(a, one_off)[0] < metrics.PSNR_CAP_DB
    assert torch.allclose(metrics.ssim(a, a.clone()), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_psnr_known_perturbation() -> None:
    a = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 1, 3, 4] = 110  # one value off by 10: MSE = 100 / (3*16*16)
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(255**2 * 768 / 100), abs=1e-9)
    c = a + 5  # every value off by 5: MSE = 25
    assert metrics.psnr(a, c).item() == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)
    assert metrics.psnr(a, c).item() == pytest.approx(34.1514, abs=1e-4)
    # the [-1, 1] -> uint8 conversion clamps and rounds like to_pil
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert metrics.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


def test_ssim_hand_values() -> None:
    # Constant images: no variance, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) exactly.
    m1, m2 = 0.2, 0.7
    a = torch.full((1, 3, 16, 16), m1, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), m2, dtype=torch.float64)
    c1 = 0.01**2
    assert metrics.ssim(a, b).item() == pytest.approx((2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), abs=1e-12)
    # Symmetric, below 1 for a perturbation, and the Gaussian window is the normalised 11-tap sigma-1.5 one.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    s = metrics.ssim(x, y)
    assert torch.allclose(s, metrics.ssim(y, x), atol=1e-12) and (s < 1).all() and (s > 0).all()
    w = metrics.gaussian_window()
    assert w.shape == (11,) and w.sum().item() == pytest.approx(1.0) and w.argmax().item() == 5
    assert (w[4] / w[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x[..., :8, :8], y[..., :8, :8])


def test_ssim_matches_torchmetrics_inside_the_border() -> None:
    """torchmetrics reflect-pads and averages the whole map; cropping its pad gives the standard valid SSIM."""
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 40, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    _, full = tm.structural_similarity_index_measure(
        y, x, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, reduction="none", return_full_image=True
    )
    assert torch.allclose(metrics.ssim(x, y), full[..., 5:-5, 5:-5].flatten(1).mean(1), atol=1e-10)


# ---------------------------------------------------------------- codecs at a byte budget


def _photo_like(size: int = 64) -> Image.Image:
    """A smooth gradient with texture: its file size grows steadily with quality."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_budget_search_takes_highest_fitting_quality(codec: str) -> None:
    image = _photo_like()
    budget = len(rec.encode_image(image, codec, 50))
    choice = rec.fit_to_budget(image, codec, budget)
    assert choice.fits and choice.quality >= 50 and choice.size <= budget
    assert choice.size == len(rec.encode_image(image, codec, choice.quality, choice.method)) == len(choice.data)
    if choice.quality < 100:
        assert len(rec.encode_image(image, codec, choice.quality + 1, choice.method)) > budget
    # a budget above every file: quality 100
    big = rec.fit_to_budget(image, codec, 10**7)
    assert big.fits and big.quality == 100


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_budget_search_none_fits_gives_smallest_file(codec: str) -> None:
    image = _photo_like()
    choice = rec.fit_to_budget(image, codec, 10)
    assert not choice.fits and choice.quality == 1 and choice.size > 10
    methods = [None] if codec == "jpeg" else [4, 6]
    assert choice.size == min(len(rec.encode_image(image, codec, 1, m)) for m in methods)
    assert choice.method in methods


def test_budget_search_checks_monotonicity(monkeypatch) -> None:
    """A codec whose size drops at one high quality: bisection alone would miss it; the check finds it."""
    sizes = {q: 10 * q for q in range(1, 101)} | {90: 50}
    monkeypatch.setattr(rec, "encode_image", lambda image, codec, q, method=None: b"x" * sizes[q])
    choice = rec.fit_to_budget(Image.new("RGB", (8, 8)), "jpeg", 300)
    assert choice.quality == 90 and choice.size == 50 and not choice.monotone
    sizes[90] = 900  # monotone again: bisection's answer, checked
    choice = rec.fit_to_budget(Image.new("RGB", (8, 8)), "jpeg", 300)
    assert choice.quality == 30 and choice.monotone


# ---------------------------------------------------------------- shapes benchmark


def test_ground_truth_renders_score_one_and_held_out_apart(tmp_path) -> None:
    report = run_shapes(None, per_category=8, ground_truth=True, no_tokenizer=True, out=tmp_path)
    s = report["summary"]
    assert s["overall"] >= 0.99
    assert set(s["accuracy"]) == set(CATEGORIES) and all(a >= 0.99 for a in s["accuracy"].values())
    assert set(s["held_out"]["categories"]) == set(HELD_OUT_CATEGORIES) and s["held_out"]["overall"] >= 0.99
    held = [it for it in report["items"] if it["set"] == "held_out"]
    main_items = [it for it in report["items"] if it["set"] == "main"]
    assert len(held) == 16 and len(main_items) == 48
    names = [f"{c} {s}" for c, s in HELD_OUT]
    assert all(any(n in it["prompt"] for n in names) for it in held)
    assert not any(any(n in it["prompt"] for n in names) for it in main_items)
    assert [it["seed"] for it in main_items[:8]] == list(range(8))
    assert s["failures"] == 0 and s["failures_sheet"] is None
    on_disk = json.loads((tmp_path / "report-shapes.json").read_text())
    assert tuple(on_disk) == REPORT_KEYS and on_disk["kind"] == "shapes" and on_disk["model"] is None


def _wrong_colours(prompts: list[str], seed: int) -> list[Image.Image]:
    """Scenes that satisfy each prompt, rendered with every colour swapped for the next palette colour (a
    derangement): shapes, counts and places right, colours all wrong."""
    names = list(PALETTE)
    images = []
    for i, p in enumerate(prompts):
        scene = scene_for_caption(p, np.random.default_rng(seed + i))
        objects = tuple(replace(o, color=names[(names.index(o.color) + 1) % len(names)]) for o in scene.objects)
        images.append(render(replace(scene, objects=objects)))
    return images


def test_wrong_colours_score_zero_where_colours_are_named() -> None:
    result = evaluate_shapes(_wrong_colours, per_category=6)
    acc = result["summary"]["accuracy"]
    assert acc["colors"] == 0 and acc["color_attr"] == 0
    assert all(acc[c] == 1.0 for c in ("single", "two", "counting", "position"))
    assert result["summary"]["held_out"]["overall"] == 0
    assert all("shapes/colours do not match" in f[3]["reason"] for f in result["failures"])


def test_cli_shapes_rejects_blank_generator(bundle, tmp_path, monkeypatch, capsys) -> None:
    calls = []

    def white(self, prompts, generator="diffusion", seed=None, height=None, **kw):
        prompts = check_prompts(prompts)
        calls.append(
            (generator, seed, kw.get("num_steps"), kw.get("guidance_scale"), kw.get("rho"), kw.get("protocol"))
        )
        size = height or self.config.image_size
        return PipelineOutput(
            images=[Image.new("RGB", (size, size), "white") for _ in prompts],
            seeds=[seed + i for i in range(len(prompts))],
            prompts=prompts,
        )

    monkeypatch.setattr(Pipeline, "__call__", white)
    out = tmp_path / "ev"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "shapes",
        "--model",
        bundle,
        "--per-category",
        3,
        "--steps",
        5,
        "--cfg",
        2.5,
        "--rho",
        1.5,
        "--protocol",
        2,
        "--seed",
        7,
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    report = json.loads((out / "report-shapes.json").read_text())
    assert tuple(report) == REPORT_KEYS
    s = report["summary"]
    assert s["overall"] == 0 and all(v == 0 for v in s["accuracy"].values()) and s["held_out"]["overall"] == 0
    assert calls and all(c == ("diffusion", 7, 5, 2.5, 1.5, 2) for c in calls)
    arguments = report["arguments"]
    assert arguments["per_category"] == 3 and arguments["guidance_scale"] == 2.5 and "cfg" not in arguments
    assert arguments["rho"] == 1.5 and arguments["protocol"] == 2
    assert report["model"] == str(bundle)
    assert all(it["reason"].startswith("expected") and not it["correct"] for it in report["items"])
    # the failure sheet holds every failure (24 < the cap)
    sheet = Path(s["failures_sheet"])
    assert sheet == out / SHEET_NAME and sheet.is_file() and s["failures_shown"] == s["failures"] == 24
    assert Image.open(sheet).size[0] > 0
    # the printed tables are the JSON's, and their cells are the summary's figures
    assert_tables_printed(report, stdout)
    rows = {r[0]: r[1:] for r in parse_table(render_table(report["tables"][0]))}
    for c in CATEGORIES:
        cat = s["categories"][c]
        assert rows[c] == [format_value(cat["accuracy"]), str(cat["correct"]), str(cat["count"])]
    assert rows["overall (mean of 6)"][0] == format_value(s["overall"])
    held_rows = {r[0]: r[1:] for r in parse_table(render_table(report["tables"][1]))}
    assert held_rows["held-out overall (mean of 2)"][0] == format_value(s["held_out"]["overall"])


def test_cli_shapes_ground_truth_through_tokenizer(bundle, tmp_path, capsys) -> None:
    """The tokenizer-ceiling mode runs with a tokenizer directory alone (a random one scores ~0)."""
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "shapes",
        "--ground-truth",
        "--model",
        bundle / "tokenizer",
        "--per-category",
        2,
        "--no-held-out",
        "--json",
        tmp_path / "r.json",
        "--out",
        tmp_path,
        "--no-progress",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["mode"] == "ground truth through the tokenizer"
    assert report["summary"]["held_out"]["categories"] == {} and len(report["items"]) == 12
    assert_tables_printed(report, stdout)
    code, _, err = run_cli(capsys, "eval", "shapes", "--no-tokenizer", "--out", tmp_path)
    assert code == 2
    assert_one_line(err, "--no-tokenizer only applies with --ground-truth")


# ---------------------------------------------------------------- reconstruction


def test_cli_reconstruction_random_tiny(bundle, tmp_path, capsys) -> None:
    out = tmp_path / "ev"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "reconstruction",
        "--model",
        bundle,
        "--data",
        "shapes",
        "--num-images",
        8,
        "--batch-size",
        3,
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    assert "LPIPS not available" in err
    report = json.loads((out / "report-reconstruction.json").read_text())
    assert tuple(report) == REPORT_KEYS and report["kind"] == "reconstruction"
    s = report["summary"]
    assert s["num_images"] == 8 and len(report["items"]) == 8
    assert s["bits_per_image"] == 16 * 32 and s["budget_bytes"] == 64
    assert s["lpips"]["available"] is False and "--lpips-weights" in s["lpips"]["reason"]
    assert report["arguments"]["data"] == "shapes" and report["arguments"]["eval_shapes_seed"] == rec.EVAL_SHAPES_SEED
    for codec in ("jpeg", "webp"):
        for it in report["items"]:
            c = it[codec]
            assert c["fits"] == (c["bytes"] <= 64) and 1 <= c["quality"] <= 100
        assert s[codec]["mean_bytes"] == pytest.approx(np.mean([it[codec]["bytes"] for it in report["items"]]))
    assert s["tokenizer"]["psnr"] == pytest.approx(np.mean([it["tokenizer"]["psnr"] for it in report["items"]]))
    assert Path(s["examples_sheet"]).is_file()
    assert_tables_printed(report, stdout)
    rows = {r[0]: r[1:] for r in parse_table(render_table(report["tables"][0]))}
    assert rows["binlat tokenizer"][1:3] == [format_value(s["tokenizer"]["psnr"]), format_value(s["tokenizer"]["ssim"])]
    assert rows["WebP"][0] == format_value(s["webp"]["mean_bytes"])

    # A tokenizer directory works as --model too, and the same images give the same figures.
    code, _, err = run_cli(
        capsys,
        "eval",
        "reconstruction",
        "--model",
        bundle / "tokenizer",
        "--num-images",
        8,
        "--json",
        tmp_path / "tok.json",
        "--out",
        tmp_path,
        "--no-progress",
    )
    assert code == 0, err
    again = json.loads((tmp_path / "tok.json").read_text())
    assert again["summary"]["tokenizer"] == s["tokenizer"]


def test_reconstruction_identical_images_and_lpips(tmp_path, random_vgg16) -> None:
    """A tokenizer stand-in that returns its input exactly: PSNR at its cap (counted as exact), SSIM 1, LPIPS 0
    (random VGG weights)."""
    lpips, status = rec.load_lpips(random_vgg16)
    assert status["available"] and lpips is not None

    class Identity(torch.nn.Module):
        config = type("C", (), {"num_tokens": 4, "num_bits": 16, "image_size": 64})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def check_size(self, h, w):
            pass

        def encode(self, x):
            return x

        def decode(self, bits, h, w):
            return bits

    data = [
        {"image": to_tensor(render(scene_for_caption("a red circle", np.random.default_rng(i)))), "caption": ""}
        for i in range(2)
    ]
    result = rec.evaluate_reconstruction(Identity(), data, 2, 64, lpips=lpips)
    t = result["summary"]["tokenizer"]
    assert (
        t["psnr"] == metrics.PSNR_CAP_DB
        and t["exact"] == 2
        and t["ssim"] == pytest.approx(1.0)
        and t["lpips"] == pytest.approx(0.0, abs=1e-6)
    )
    assert result["summary"]["budget_bytes"] == 8 and result["items"][0]["jpeg"]["lpips"] > 0
    with pytest.raises(FileNotFoundError, match="--lpips-weights"):
        rec.load_lpips(tmp_path / "missing.safetensors")


def test_reconstruction_errors_are_one_line(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "eval", "reconstruction", "--model", tmp_path / "nope", "--out", tmp_path)
    assert code == 1
    assert_one_line(err, "does not exist")
    code, _, err = run_cli(capsys, "eval", "reconstruction", "--model", tmp_path, "--out", tmp_path)
    assert code == 1
    assert_one_line(err, "neither a pipeline bundle")


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


def test_contact_sheet_labels_wrap_at_words() -> None:
    """Grid labels are never cut mid-word (issue 27): long prompts wrap, and only past the line limit does the last
    line end in an ellipsis."""
    from binlat.grid import MAX_LABEL_LINES, contact_sheet, label_lines

    prompt = "a photo of a purple triangle to the left of a yellow square on a white background"
    lines = label_lines(prompt, 24)
    assert " ".join(lines) == prompt and all(len(x) <= 24 for x in lines)
    words = set(prompt.split())
    assert all(w in words for x in lines for w in x.split())  # every piece is a whole word
    long = label_lines(" ".join(["circle"] * 60), 24)
    assert len(long) == MAX_LABEL_LINES and long[-1].endswith("…")
    from PIL import Image

    short = contact_sheet([Image.new("RGB", (8, 8))] * 2, ["a", "b"], cell=144)
    tall = contact_sheet([Image.new("RGB", (8, 8))] * 2, [prompt, "b"], cell=144)
    assert tall.height > short.height  # the label rows grow with the wrapped text
