"""`binlat eval reconstruction`: how well the tokenizer's K x B bits reproduce unseen images, next to JPEG and WebP
held to the same number of bytes.

For N images of a data SPEC (``shapes`` means the shapes stream at the evaluation seed ``EVAL_SHAPES_SEED``, which
no training preset uses; other specs are read with centre crops) every image is encoded to bits and decoded, and
compressed with JPEG and WebP (Pillow) at the highest quality 1..100 whose file is no larger than the tokenizer's
budget of K*B/8 bytes. Where no quality fits, the codec's smallest file (quality 1; WebP also with method 6) is
used and its size reported. Metrics on uint8 images (reconstructions clamped to [-1, 1] and rounded, as
``to_pil`` does): PSNR and SSIM (binlat.metrics) and, when local VGG16/LPIPS weights are given, the LPIPS-style
distance of ``PerceptualLoss``.
"""

from __future__ import annotations

import io
import itertools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from binlat.metrics import PSNR_CAP_DB, psnr, ssim, to_uint8

EVAL_SHAPES_SEED = 12345  # the shapes stream for evaluation; training presets draw from other seeds
CODECS = ("jpeg", "webp")
_CODEC_NAMES = {"jpeg": "JPEG", "webp": "WebP"}
WEBP_DEFAULT_METHOD, WEBP_SMALLEST_METHOD = 4, 6
QUALITY_MIN, QUALITY_MAX = 1, 100


# ---------------------------------------------------------------- uint8 images and PIL


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()), "RGB")


# ---------------------------------------------------------------- codecs at a byte budget


def encode_image(image: Image.Image, codec: str, quality: int, method: int | None = None) -> bytes:
    """The file Pillow writes for `image` with `codec` ('jpeg' with optimised Huffman tables; 'webp' lossy with
    `method` 0..6, default 4) at `quality` 1..100."""
    buf = io.BytesIO()
    image = image.convert("RGB")
    if codec == "jpeg":
        image.save(buf, format="JPEG", quality=int(quality), optimize=True)
    elif codec == "webp":
        image.save(buf, format="WEBP", quality=int(quality), method=WEBP_DEFAULT_METHOD if method is None else method)
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@dataclass
class CodecChoice:
    """The file chosen for one image: the highest quality that fits, or the smallest file when none does."""

    codec: str
    quality: int
    method: int | None
    size: int  # bytes
    fits: bool  # size <= budget
    data: bytes = field(repr=False)
    monotone: bool = True  # False when file size was seen to fall as quality rose (the search then scans all)
    tried: dict[int, int] = field(default_factory=dict, repr=False)  # quality -> size of every file made


def _search(image: Image.Image, codec: str, budget: float, method: int | None) -> CodecChoice | None:
    """Highest quality whose file fits `budget` bytes, by bisection on 1..100 assuming size grows with quality.

    The assumption is checked: qualities above the answer are probed at a stride (and every size made is checked
    for order); if any of them fits after all, every quality is tried and the true highest fitting one is taken."""
    files: dict[int, bytes] = {}

    def size(q: int) -> int:
        if q not in files:
            files[q] = encode_image(image, codec, q, method)
        return len(files[q])

    if size(QUALITY_MIN) > budget:
        return None
    lo, hi = QUALITY_MIN, QUALITY_MAX
    if size(hi) <= budget:
        lo = hi
    else:  # size(lo) fits, size(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if size(mid) <= budget:
                lo = mid
            else:
                hi = mid
    probes = sorted({q for q in (lo + 2, *range(lo + 10 - lo % 10, QUALITY_MAX + 1, 10)) if lo + 1 < q <= QUALITY_MAX})
    violated = any(size(q) <= budget for q in probes)
    ordered = [files[q] for q in sorted(files)]
    violated = violated or any(len(x) > len(y) for x, y in zip(ordered, ordered[1:]))
    best = lo
    if violated:
        best = max(q for q in range(QUALITY_MIN, QUALITY_MAX + 1) if size(q) <= budget)
    return CodecChoice(
        codec,
        best,
        method,
        size(best),
        True,
        files[best],
        monotone=not violated,
        tried={q: len(d) for q, d in sorted(files.items())},
    )


def fit_to_budget(image: Image.Image, codec: str, budget_bytes: float) -> CodecChoice:
    """The `codec` file of `image` at the highest quality whose size is <= `budget_bytes`.

    WebP is searched with its default method 4, then (if nothing fits) with method 6. Where no quality fits, the
    smallest file the codec makes is returned (quality 1; for WebP the smaller of methods 4 and 6), `fits=False`."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    methods: Sequence[int | None] = (None,) if codec == "jpeg" else (WEBP_DEFAULT_METHOD, WEBP_SMALLEST_METHOD)
    for method in methods:
        choice = _search(image, codec, budget_bytes, method)
        if choice is not None:
            return choice
    smallest = min((encode_image(image, codec, QUALITY_MIN, m), m) for m in methods)
    data, method = smallest[0], smallest[1]
    return CodecChoice(codec, QUALITY_MIN, method, len(data), False, data)


# ---------------------------------------------------------------- models and data


def load_tokenizer(model: str | Path, device: str | torch.device = "cpu"):
    """A tokenizer from a pipeline bundle (its tokenizer/) or a tokenizer model directory."""
    from binlat.bundle import INDEX_NAME
    from binlat.tokenizer import BinaryTokenizer

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist (pass --model DIR: a pipeline bundle or a tokenizer directory)"
        )
    if (path / INDEX_NAME).is_file():
        path = path / "tokenizer"
    elif not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: neither a pipeline bundle ({INDEX_NAME}) nor a tokenizer directory "
            f"(config.json + model.safetensors)"
        )
    return BinaryTokenizer.from_pretrained(path, device=device)


def load_lpips(weights: str | Path | None) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """(PerceptualLoss, status) for a local weights file; (None, status with the reason) without one."""
    if not weights:
        return None, {
            "available": False,
            "reason": "no --lpips-weights FILE given (a local safetensors file of VGG16 "
            "features under torchvision's names, optionally with LPIPS heads)",
        }
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights {path} not found: pass --lpips-weights with a local safetensors file "
            f"of VGG16 features (torchvision names), or leave it out to skip LPIPS"
        )
    from binlat.tokenizer.losses import PerceptualLoss

    return PerceptualLoss(path), {"available": True, "reason": None, "weights": str(path)}


def eval_dataset(spec: str, size: int, allow_commands: bool = False):
    """The data SPEC as evaluation images: ``shapes`` -> the evaluation-seed stream, else centre crops.
    ``allow_commands``: see :func:`binlat.data.readers.make_dataset` (only for a spec the user typed)."""
    from binlat.data.readers import make_dataset

    return make_dataset(
        spec, size=size, seed=EVAL_SHAPES_SEED, random_crop=False, hflip=False, allow_commands=allow_commands
    )


def _batches(samples: Iterable[dict[str, Any]], n: int, batch_size: int) -> Iterable[list[dict[str, Any]]]:
    it = itertools.islice(iter(samples), n)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch


# ---------------------------------------------------------------- the evaluation


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _lpips_one(lpips: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    """LPIPS-style distance of two uint8 images [3, H, W] (fed in [-1, 1], as in training)."""
    device = next(lpips.buffers()).device
    x = a.unsqueeze(0).float().to(device) / 127.5 - 1
    y = b.unsqueeze(0).float().to(device) / 127.5 - 1
    with torch.inference_mode():
        return float(lpips(x, y))


def evaluate_reconstruction(
    tokenizer,
    data: Iterable[dict[str, Any]],
    num_images: int,
    size: int,
    batch_size: int = 16,
    lpips: torch.nn.Module | None = None,
    codecs: Sequence[str] = CODECS,
    keep_examples: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenizer vs codecs on the first `num_images` samples of `data`.

    Returns ``{"summary", "items", "examples"}``; examples are up to `keep_examples` rows of PIL images
    (original, tokenizer, then one per codec) for a comparison sheet."""
    cfg = tokenizer.config
    tokenizer.check_size(size, size)
    bits = cfg.num_tokens * cfg.num_bits
    budget = bits / 8
    device = next(tokenizer.parameters()).device
    items: list[dict[str, Any]] = []
    examples: list[list[Image.Image]] = []
    index = 0
    for batch in _batches(data, num_images, batch_size):
        images = torch.stack([s["image"] for s in batch])
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"data gave {images.shape[-2]}x{images.shape[-1]} images, expected {size}x{size}")
        with torch.inference_mode():
            x = images.to(device)
            recon = tokenizer.decode(tokenizer.encode(x), size, size)
        original, rec = to_uint8(images), to_uint8(recon.cpu())
        tok_psnr, tok_ssim = psnr(rec, original), ssim(rec, original)
        for j, sample in enumerate(batch):
            item: dict[str, Any] = {
                "index": index,
                "key": sample.get("key", f"shapes-{EVAL_SHAPES_SEED}-{index}"),
                "caption": sample.get("caption", ""),
            }
            item["tokenizer"] = {
                "bytes": budget,
                "psnr": float(tok_psnr[j]),
                "ssim": float(tok_ssim[j]),
                "lpips": _lpips_one(lpips, rec[j], original[j]) if lpips is not None else None,
            }
            pil = uint8_to_pil(original[j])
            row = [pil, uint8_to_pil(rec[j])]
            for codec in codecs:
                choice = fit_to_budget(pil, codec, budget)
                dec = pil_to_uint8(decode_image(choice.data))
                item[codec] = {
                    "quality": choice.quality,
                    "method": choice.method,
                    "bytes": choice.size,
                    "fits": choice.fits,
                    "monotone": choice.monotone,
                    "psnr": float(psnr(dec, original[j])[0]),
                    "ssim": float(ssim(dec, original[j])[0]),
                    "lpips": _lpips_one(lpips, dec, original[j]) if lpips is not None else None,
                }
                row.append(uint8_to_pil(dec))
            if len(examples) < keep_examples:
                examples.append(row)
            items.append(item)
            index += 1
        if progress:
            print(f"\rreconstruction: {index}/{num_images} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if not items:
        raise ValueError("the data gave no images to evaluate")

    def side(name: str) -> dict[str, Any]:
        rows = [it[name] for it in items]
        out = {
            "psnr": _mean([r["psnr"] for r in rows]),
            "exact": sum(r["psnr"] >= PSNR_CAP_DB for r in rows),
            "ssim": _mean([r["ssim"] for r in rows]),
            "lpips": _mean([r["lpips"] for r in rows]) if lpips is not None else None,
            "mean_bytes": _mean([r["bytes"] for r in rows]),
        }
        if name != "tokenizer":
            out |= {
                "fits": sum(r["fits"] for r in rows),
                "mean_quality": _mean([r["quality"] for r in rows]),
                "min_quality": min(r["quality"] for r in rows),
                "max_quality": max(r["quality"] for r in rows),
                "max_bytes": max(r["bytes"] for r in rows),
                "monotone_violations": sum(not r["monotone"] for r in rows),
            }
        return out

    summary = {
        "num_images": len(items),
        "image_size": size,
        "num_tokens": cfg.num_tokens,
        "bits_per_token": cfg.num_bits,
        "bits_per_image": bits,
        "budget_bytes": budget,
        "tokenizer": side("tokenizer"),
    } | {c: side(c) for c in codecs}
    return {"summary": summary, "items": items, "examples": examples}


def reconstruction_tables(summary: dict[str, Any], codecs: Sequence[str] = CODECS) -> list[dict[str, Any]]:
    from .report import make_table

    n = summary["num_images"]
    title = (
        f"reconstruction: {n} images at {summary['image_size']} px; budget {summary['num_tokens']} x "
        f"{summary['bits_per_token']} bits = {summary['bits_per_image']} bits = {summary['budget_bytes']:g} bytes"
    )
    columns = ["method", "bytes/image", "PSNR dB", "SSIM", "LPIPS", "fits budget", "quality"]
    t = summary["tokenizer"]
    rows: list[list[Any]] = [["binlat tokenizer", t["mean_bytes"], t["psnr"], t["ssim"], t["lpips"], f"{n}/{n}", None]]
    for c in codecs:
        s = summary[c]
        q = s["mean_quality"]
        rows.append([_CODEC_NAMES[c], s["mean_bytes"], s["psnr"], s["ssim"], s["lpips"], f"{s['fits']}/{n}", q])
    return [make_table(title, columns, rows)]


def run_reconstruction(
    model: str | Path,
    data: str,
    num_images: int = 64,
    size: int | None = None,
    batch_size: int = 16,
    lpips_weights: str | Path | None = None,
    out: str | Path = "out/eval",
    json_path: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
    allow_data_commands: bool = False,
) -> dict[str, Any]:
    """The whole `binlat eval reconstruction`: evaluate, write the report and a comparison sheet; return the report
    (its "tables" are what the CLI prints)."""
    from binlat.grid import contact_sheet
    from binlat.io import atomic_write_bytes

    from .report import make_report, report_path, write_report

    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")
    lpips, lpips_status = load_lpips(lpips_weights)
    tokenizer = load_tokenizer(model, device)
    if lpips is not None:
        lpips = lpips.to(device)
    size = size or tokenizer.config.image_size
    tokenizer.check_size(size, size)
    result = evaluate_reconstruction(
        tokenizer, eval_dataset(data, size, allow_data_commands), num_images, size, batch_size, lpips, progress=progress
    )
    summary = result["summary"] | {"lpips": lpips_status}
    out = Path(out)
    sheet = None
    if result["examples"]:
        labels, images = [], []
        for i, row in enumerate(result["examples"]):
            it = result["items"][i]
            names = ["original", f"binlat {summary['budget_bytes']:g} B"] + [
                f"{_CODEC_NAMES[c]} q{it[c]['quality']} {it[c]['bytes']} B" for c in CODECS
            ]
            labels += names
            images += row
        buf = io.BytesIO()
        contact_sheet(images, labels, columns=len(result["examples"][0]), cell=128).save(buf, format="PNG")
        sheet = out / "reconstruction-examples.png"
        atomic_write_bytes(sheet, buf.getvalue())
    summary["examples_sheet"] = None if sheet is None else str(sheet)
    arguments = {
        "model": str(model),
        "data": data,
        "num_images": num_images,
        "size": size,
        "batch_size": batch_size,
        "lpips_weights": None if lpips_weights is None else str(lpips_weights),
        "device": str(device),
        "eval_shapes_seed": EVAL_SHAPES_SEED,
        "codecs": list(CODECS),
        "webp_methods": [WEBP_DEFAULT_METHOD, WEBP_SMALLEST_METHOD],
        "jpeg_optimize": True,
    }
    report = make_report(
        "reconstruction", str(model), arguments, summary, result["items"], reconstruction_tables(summary)
    )
    path = write_report(report, report_path(json_path, out, "reconstruction"))
    report["path"] = str(path)
    return report
