"""`binlat probe`: train a preset for N steps with some changes and score it, one row per probe.

A probe is how a recipe change earns its place (docs/recipe.md keeps the table). A tokenizer is scored on true
`shapes` renders of the probe prompt set (seed PROBE_SEED, not the published evaluation's seed 0): the PSNR of its
round trip with thresholded bits and the judged accuracy of that round trip (its ceiling on the benchmark), overall,
in the worst category and on the held-out compositions. A generator is scored by the judged accuracy of its images
on the same prompt set. Both use the run's EMA weights, as a shipped model would.

A probe trains (binlat.train) and judges (binlat.eval), so it sits above both, beside binlat.bench.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .io import append_jsonl, read_jsonl
from .metrics import psnr_of_mse

if TYPE_CHECKING:
    from .train.tasks import GeneratorTask

PROBE_SEED = 1000
PROBE_THRESHOLD_DB = 18.0  # fidelity milestone (a): off the all-white plateau


def score_tokenizer(tokenizer, size: int, per_category: int, seed: int = PROBE_SEED) -> dict[str, float]:
    """One round trip of the probe prompt set's true renders: judged (the ceiling) and compared pixel by pixel."""
    from .data.shapes import to_tensor
    from .eval.shapes_eval import ground_truth_images
    from .generation import to_pil
    from .judge.accuracy import evaluate_shapes

    renders, recons = [], []

    def round_trip(prompts: list[str], base_seed: int):
        truth = torch.stack([to_tensor(im) for im in ground_truth_images(size)(prompts, base_seed)])
        with torch.inference_mode():
            recon = torch.cat([tokenizer.decode(tokenizer.encode(x), size, size).clamp(-1, 1) for x in truth.split(32)])
        renders.append(truth)
        recons.append(recon)
        return to_pil(recon)

    summary = evaluate_shapes(round_trip, per_category, seed)["summary"]
    mse = torch.mean((torch.cat(recons) - torch.cat(renders)) ** 2).item()
    return {"psnr": psnr_of_mse(max(mse, 1e-10)), **_accuracy(summary)}


def score_generator(
    pipe,
    kind: str,
    size: int,
    per_category: int,
    seed: int = PROBE_SEED,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
) -> dict[str, float]:
    """Judged accuracy of the pipeline's images; settings left None take the pipeline's (else the built-ins)."""
    from .judge.accuracy import evaluate_shapes, pipeline_images

    images = pipeline_images(pipe, kind, num_steps=num_steps, guidance_scale=guidance_scale, size=size)
    return _accuracy(evaluate_shapes(images, per_category, seed)["summary"])


@torch.inference_mode()
def validation_loss(task, network, count: int = 256, seed: int = PROBE_SEED) -> float:
    """The generator's training loss on `count` held-out `shapes` samples (seed `seed`, held-out pairs excluded,
    captions never dropped), with each sample's randomness (t, noise) drawn from its own seeded generator: the same
    number for the same weights. It moves long before judged accuracy leaves 0, so it ranks short probes."""
    from .data.shapes import ShapesStream
    from .processes.common import make_generators

    stream = ShapesStream(size=task.cfg.image_size, seed=seed)
    total = 0.0
    for start in range(0, count, 64):
        samples = [stream.sample(i) for i in range(start, min(start + 64, count))]
        bits = task.tokenizer.encode(torch.stack([s["image"] for s in samples]).to(task.device)).float()
        text = task.cached_text([s["caption"] for s in samples]).to(task.device)
        generators = make_generators(list(range(start, start + len(samples))), task.device)
        loss, _ = task.process.loss(network.eval(), bits, text, generators)
        total += float(loss) * len(samples)
    return total / count


def _accuracy(summary: dict[str, Any]) -> dict[str, Any]:
    """The row's scores: overall, worst category, held-out, position, and of the position images with the right
    two objects how many held the relation / reversed it / missed the axis (the binding failure, issue 26)."""
    relations = summary.get("relations") or {}
    return {
        "accuracy": summary["overall"],
        "worst": min(summary["accuracy"].values()),
        "held_out": summary["held_out"]["overall"],
        "position": summary["accuracy"].get("position"),
        "relation_holds_reversed_axis": [relations.get(k, 0) for k in ("holds", "reversed", "axis")],
    }


def images_to_threshold(run_dir: Path, batch_size: int, threshold: float = PROBE_THRESHOLD_DB) -> int | None:
    """Training images seen when the run's logged held-out PSNR (eval_psnr) first reached `threshold` dB."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for row in read_jsonl(path):
        if isinstance(row, dict) and row.get("eval_psnr", -1.0) >= threshold:
            return row["step"] * batch_size
    return None


def run_probe(
    cfg, change: str, out_root: str | Path = "runs/probes", per_category: int = 16, resume: str | None = "auto"
) -> dict[str, Any]:
    """Train `cfg` (a TrainConfig with the probe's changes applied) into out_root/<slug>, score it, and append
    the row to out_root/probes.jsonl."""
    from .hardware import cpu_info
    from .train.checkpoints import export_run
    from .train.engine import Trainer

    out_root = Path(out_root)
    run_dir = out_root / _slug(f"{cfg.kind}-{change}")
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir, resume=resume)
    first_step = trainer.step
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    model = export_run(run_dir, run_dir / "export")
    row: dict[str, Any] = {
        "change": change,
        "kind": cfg.kind,
        "steps": cfg.max_steps,
        "images": cfg.max_steps * cfg.batch_size,
        "wall_min": round(minutes, 1),
        "resumed_at": first_step or None,
        "cpu": cpu_info().model,
        "threads": torch.get_num_threads(),
    }
    if cfg.kind == "tokenizer":
        from .tokenizer import BinaryTokenizer

        tokenizer = BinaryTokenizer.from_pretrained(model).eval()
        row |= score_tokenizer(tokenizer, cfg.image_size, per_category)
        row["images_to_18db"] = images_to_threshold(run_dir, cfg.batch_size)
    else:
        from .pipeline import Pipeline
        from .registry import model_class

        net = model_class(cfg.kind).from_pretrained(model)
        task = cast("GeneratorTask", trainer.task)  # a generator kind's run trains a GeneratorTask
        # a run on precomputed text states has neither: an error naming that, where Pipeline(None, ...) failed
        tokenizer, text_encoder = task.frozen_encoders("the probe's sampling")
        pipe = Pipeline(tokenizer, text_encoder, **{cfg.kind: net})
        row["val_loss"] = validation_loss(trainer.task, net)
        # Sampled as the run's own running score samples (generator.sample_steps, .sample_guidance), not with the
        # built-in guidance 7.5, which mostly amplifies a short run's errors.
        row |= {"guidance": cfg.generator.sample_guidance}
        row |= score_generator(
            pipe,
            cfg.kind,
            cfg.image_size,
            per_category,
            num_steps=cfg.generator.sample_steps,
            guidance_scale=cfg.generator.sample_guidance,
        )
    row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    append_jsonl(out_root / "probes.jsonl", [row])
    return row


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")[:80] or "probe"
