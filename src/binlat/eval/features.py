"""`binlat eval clip-score` and `binlat eval fid`: thin wrappers over torchmetrics that never download anything.

CLIP score: torchmetrics' ``CLIPScore`` (100 x cosine of CLIP image and text embeddings, mean over images, floored
at 0) with a CLIP model read from a local Hugging Face directory (``local_files_only``). FID: torchmetrics'
``FrechetInceptionDistance``; its default feature extractor is torch-fidelity's FID InceptionV3, whose weights
must be given as a local file (``feature_extractor_weights_path``). A missing model, weights file or package is
one clear line saying what to supply, before anything heavy is loaded. ``frechet_distance`` also takes any
``nn.Module`` feature extractor (torchmetrics' custom-extractor path), which the tests use offline.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..io import read_jsonl

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights


class MissingResource(OSError):
    """A model, weights file or package that must be supplied locally (exit 1, one line)."""


def _torchmetrics():
    try:
        import torchmetrics
    except ImportError:
        raise MissingResource(
            "this evaluation needs the torchmetrics package: pip install torchmetrics (it keeps your torch)"
        ) from None
    return torchmetrics


# ---------------------------------------------------------------- images and prompts


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive; hidden entries skipped), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_uint8(path: Path) -> torch.Tensor:
    """An image file as uint8 [3, H, W] RGB (one-line error naming the file when it is not an image)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_prompts(images: str | Path, prompts: str | Path | None) -> list[tuple[Path, str]]:
    """(image, prompt) pairs.

    `prompts` is a ``metadata.jsonl`` (lines with "file" and "prompt", as ``binlat generate`` writes; files relative
    to the jsonl's folder) or a text file with one prompt per line, paired in order with the sorted images of
    `images`. Without it, ``<images>/metadata.jsonl`` is used."""
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    if prompts is None:
        prompts = images / "metadata.jsonl"
        if not prompts.is_file():
            raise ValueError(
                f"no prompts: give --prompts FILE (one prompt per line, in sorted image order) or "
                f"--prompts metadata.jsonl; {prompts} does not exist"
            )
    prompts = Path(prompts)
    try:
        if prompts.suffix.lower() == ".jsonl":  # an append-only log: a torn last line is skipped with a warning
            rows, text = read_jsonl(prompts, numbered=True), ""
        else:
            rows, text = [], prompts.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise OSError(f"cannot read prompts file {prompts}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {prompts} is not valid UTF-8 (byte {e.start})") from None
    pairs: list[tuple[Path, str]] = []
    if prompts.suffix.lower() == ".jsonl":
        for n, row in rows:
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("file"), str)
                or not isinstance(row.get("prompt"), str)
            ):
                raise ValueError(f"{prompts} line {n}: expected an object with string 'file' and 'prompt'")
            path = prompts.parent / row["file"]
            if not path.is_file():
                path = images / row["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{prompts} line {n}: image {row['file']} not found")
            pairs.append((path, row["prompt"]))
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        files = list_images(images)
        if len(lines) != len(files):
            raise ValueError(
                f"{prompts} has {len(lines)} prompts but {images} holds {len(files)} images; they are "
                f"paired in sorted file order, so the counts must match"
            )
        pairs = list(zip(files, lines))
    if not pairs:
        raise ValueError(f"no (image, prompt) pairs in {prompts}")
    return pairs


# ---------------------------------------------------------------- CLIP score


class _ClipFeatures(torch.nn.Module):
    """Adapts a transformers CLIPModel to what torchmetrics expects of it: `get_image_features` and
    `get_text_features` returning the projected embeddings as tensors (transformers 5 returns model outputs
    whose pooler_output holds them, which torchmetrics <= 1.9 cannot normalise). The last embeddings returned
    are kept, so each image's own score can be read after a batch update."""

    model: Any  # a CLIPModel, or a stand-in with its two feature methods

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.last: dict[str, torch.Tensor] = {}

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        if pooled is None and isinstance(out, (tuple, list)):
            pooled = out[1] if len(out) > 1 else out[0]
        if not isinstance(pooled, torch.Tensor):
            raise TypeError(f"CLIP model returned {type(out).__name__}, not embeddings")
        return pooled

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.last["image"] = self._tensor(self.model.get_image_features(*args, **kwargs))
        return self.last["image"]

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.last["text"] = self._tensor(self.model.get_text_features(*args, **kwargs))
        return self.last["text"]

    def last_scores(self) -> list[float]:
        """100 x cosine of the last image and text embeddings, pair by pair (CLIPScore's per-sample score)."""
        img, txt = self.last["image"].float(), self.last["text"].float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return [float(v) for v in 100 * (img * txt).sum(-1)]


def load_clip(model_dir: str | Path | None):
    """(model, processor) from a local Hugging Face CLIP directory, never downloading."""
    where = (
        "a local Hugging Face CLIP model directory (config.json, model weights, tokenizer and preprocessor "
        "files, e.g. a saved copy of openai/clip-vit-large-patch14)"
    )
    if model_dir is None:
        raise MissingResource(f"CLIP score needs {where}: pass --clip-model DIR; nothing is downloaded")
    path = Path(model_dir)
    if not path.is_dir():
        raise MissingResource(f"CLIP model directory {path} does not exist: pass --clip-model DIR with {where}")
    if not (path / "config.json").is_file():
        raise MissingResource(
            f"{path} is not a Hugging Face model directory (no config.json): pass --clip-model DIR with {where}"
        )
    try:
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    except Exception as e:  # noqa: BLE001 - any loading failure is the same one-line message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MissingResource(
            f"cannot load a CLIP model from {path} ({first}); pass --clip-model DIR with {where}"
        ) from None
    return model.eval(), processor


def clip_scores(
    pairs: Sequence[tuple[Path, str]], model, processor, batch_size: int = 16, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """torchmetrics CLIPScore over the pairs; also each image's own score (100 x cosine)."""
    _torchmetrics()
    from torchmetrics.multimodal.clip_score import CLIPScore

    wrapped = _ClipFeatures(model).to(device)
    # torchmetrics accepts a loader (a callable returning model and processor) where its hints name only model ids
    metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor)).to(device)  # type: ignore[arg-type, return-value]
    per_item: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            metric.update([load_uint8(p).to(device) for p, _ in batch], [t for _, t in batch])
            per_item += wrapped.last_scores()
        value = float(metric.compute())
    items = [{"file": str(p), "prompt": t, "clip_score": s} for (p, t), s in zip(pairs, per_item)]
    return {"summary": {"clip_score": value, "num_images": len(pairs)}, "items": items}


def run_clip_score(
    images: str | Path,
    prompts: str | Path | None = None,
    clip_model: str | Path | None = None,
    batch_size: int = 16,
    out: str | Path = "out/eval",
    json_path: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    from .report import make_report, make_table, report_path, write_report

    pairs = read_prompts(images, prompts)
    _torchmetrics()
    model, processor = load_clip(clip_model)
    result = clip_scores(pairs, model, processor, batch_size, device)
    s = result["summary"]
    tables = [make_table(f"CLIP score ({clip_model})", ["images", "CLIP score"], [[s["num_images"], s["clip_score"]]])]
    arguments = {
        "images": str(images),
        "prompts": None if prompts is None else str(prompts),
        "clip_model": str(clip_model),
        "batch_size": batch_size,
        "device": str(device),
    }
    report = make_report("clip-score", str(clip_model), arguments, s, result["items"], tables)
    report["path"] = str(write_report(report, report_path(json_path, out, "clip-score")))
    return report


# ---------------------------------------------------------------- FID


def _fid_supports_weights_path() -> bool:
    from torchmetrics.image.fid import FrechetInceptionDistance

    return "feature_extractor_weights_path" in inspect.signature(FrechetInceptionDistance.__init__).parameters


def check_inception(weights: str | Path | None) -> Path:
    """The local FID Inception weights, with torch-fidelity and a torchmetrics that can load them; otherwise one
    line naming everything that is missing."""
    tm = _torchmetrics()
    missing = []
    if weights is None:
        missing.append(
            f"the FID Inception weights (torch-fidelity's {FID_WEIGHTS_NAME}): pass --inception-weights FILE"
        )
    elif not Path(weights).is_file():
        missing.append(
            f"the FID Inception weights file: {weights} does not exist (pass --inception-weights FILE, "
            f"torch-fidelity's {FID_WEIGHTS_NAME})"
        )
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not bool(_TORCH_FIDELITY_AVAILABLE):
        missing.append(
            "the torch-fidelity package, which holds FID's InceptionV3 (pip install torch-fidelity "
            "with a torchvision that matches your torch)"
        )
    if not missing and not _fid_supports_weights_path():
        missing.append(
            f"a torchmetrics that loads Inception weights from a file (this is {tm.__version__}; upgrade torchmetrics)"
        )
    if missing:
        raise MissingResource("FID cannot run: it needs " + "; and ".join(missing) + "; nothing is downloaded")
    assert weights is not None  # else `missing` named it
    return Path(weights)


def _batches_by_size(paths: Sequence[Path], batch_size: int):
    batch: list[torch.Tensor] = []
    for p in paths:
        img = load_uint8(p)
        if batch and (img.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


def frechet_distance(
    real: Sequence[Path],
    fake: Sequence[Path],
    feature: int | torch.nn.Module = 2048,
    weights: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> float:
    """torchmetrics FID between two lists of image files (uint8 RGB, batched by equal size). `feature` is an
    Inception feature width (needs `weights`) or any module mapping uint8 [N, 3, H, W] to [N, D]."""
    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, paths in (("real", real), ("fake", fake)):
        if len(paths) < 2:
            raise ValueError(f"FID needs at least 2 {name} images, got {len(paths)}")
    kwargs: dict[str, Any] = {"normalize": False}
    if isinstance(feature, int):
        kwargs["feature_extractor_weights_path"] = str(weights)
    metric = FrechetInceptionDistance(feature=feature, **kwargs).to(device)
    with torch.no_grad():
        for is_real, paths in ((True, real), (False, fake)):
            for batch in _batches_by_size(paths, batch_size):
                metric.update(batch.to(device), real=is_real)
        return float(metric.compute())


def run_fid(
    real: str | Path,
    fake: str | Path,
    inception_weights: str | Path | None = None,
    batch_size: int = 32,
    out: str | Path = "out/eval",
    json_path: str | Path | None = None,
    device: str = "cpu",
    feature: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """The whole `binlat eval fid`. `feature` replaces the Inception network (for tests; reported as custom)."""
    from .report import make_report, make_table, report_path, write_report

    real_files, fake_files = list_images(real), list_images(fake)
    for name, folder, files in (("real", real, real_files), ("fake", fake, fake_files)):
        if len(files) < 2:
            raise ValueError(f"FID needs at least 2 images in the {name} folder {folder}, found {len(files)}")
    if feature is None:
        weights = check_inception(inception_weights)
        value = frechet_distance(real_files, fake_files, 2048, weights, batch_size, device)
        extractor = f"FID InceptionV3 pool3 (2048) from {weights}"
    else:
        value = frechet_distance(real_files, fake_files, feature, None, batch_size, device)
        extractor = f"custom {type(feature).__name__}"
    summary = {"fid": value, "num_real": len(real_files), "num_fake": len(fake_files), "feature_extractor": extractor}
    tables = [make_table("FID", ["real images", "fake images", "FID"], [[len(real_files), len(fake_files), value]])]
    arguments = {
        "real": str(real),
        "fake": str(fake),
        "inception_weights": None if inception_weights is None else str(inception_weights),
        "batch_size": batch_size,
        "device": str(device),
    }
    items = [{"file": str(p), "set": "real"} for p in real_files] + [
        {"file": str(p), "set": "fake"} for p in fake_files
    ]
    report = make_report("fid", None, arguments, summary, items, tables)
    report["path"] = str(write_report(report, report_path(json_path, out, "fid")))
    return report
