"""Table 5: one optimiser step of each trainer, taken by binlat.train's own Trainer, each in a fresh subprocess.

The worker builds the Trainer from the preset's training config (model sizes and batch from the plan) and times
`Trainer.train_step` on a fixed batch of random data, so the bench times exactly what `binlat train` runs per step:
the task's loss, backward, gradient clipping, AdamW and the EMA update."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from typing import Any

import torch

from .harness import PeakRSS, Table, fmt_s, memory_available_mib, target
from .inputs import text_features
from .plan import TRAIN_KINDS, UNCOND_REAL, Plan
from .throughput import peak_flops, training_step_flops


# --- the parent: one worker per trainer -------------------------------------------------------------------------
def train_spec(plan: Plan, kind: str) -> dict[str, Any]:
    """What a worker trains: the preset's training config for `kind` with the plan's sizes, batch and precision."""
    model = plan.shipped_tokenizer if kind == "tokenizer" else plan.generator_fields(kind, plan.shipped_generator)
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in model.items()}
    config = dict(
        plan.train_configs[kind],
        model=model,
        batch_size=plan.train_batches[kind],
        grad_accum=1,
        max_steps=plan.train_steps + 1,
        mixed_precision="bf16" if plan.train_bf16 else "no",
        grad_checkpointing=plan.train_checkpointing,
        trackers=[],
        sample_every=0,
        num_workers=0,
    )
    if not plan.train_compiled:  # a compiled forward costs minutes of compiling before its first step
        config["compile"] = False
    if kind == "tokenizer":
        config["image_size"] = model["image_size"]
    return {
        "kind": kind,
        "config": config,
        "steps": plan.train_steps,
        "threads": torch.get_num_threads(),
        "text_length": plan.text_length,
    }


def _param_count(spec: dict[str, Any]) -> int:
    from ..train.checkpoints import model_for_export

    with torch.device("meta"):
        net = model_for_export(spec["kind"], spec["config"]["model"])
    return sum(p.numel() for p in net.parameters())


def _run_worker(spec: dict[str, Any]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    return subprocess.Popen(
        [sys.executable, "-m", "binlat.bench", "--train-worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _collect(proc: subprocess.Popen) -> dict[str, Any]:
    """The worker's result, or {"error": why} (a killed or crashed worker costs its row, not the table)."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no message (killed? out of memory?)"])[-1]
        return {"error": f"worker failed (exit {proc.returncode}): {last}"}
    return json.loads(out.strip().splitlines()[-1])


def _tokenizer_losses(config: dict[str, Any], steps: int) -> str:
    from ..config import config_from_dict
    from ..train.config import TrainConfig

    o = config_from_dict(TrainConfig, config, "tokenizer config").tokenizer
    weights = {
        "smooth-L1": o.l1_weight,
        "MSE": o.l2_weight,
        "image-gradient L1": o.gradient_weight,
        "perceptual": o.perceptual_weight,
        "bit regulariser": o.bit_reg_weight,
        "GAN": o.gan_weight,
    }
    text = " + ".join(f"{name} x{w:g}" for name, w in weights.items() if w)
    if o.perceptual_weight:
        text += " (perceptual only with tokenizer.perceptual_weights on disk)"
    if o.gan_weight and o.gan_start > steps:
        text += f" (GAN from step {o.gan_start}: off in these steps)"
    return text


def _precisions(plan: Plan, table: Table) -> tuple[Plan, list[bool]]:
    """The plan to time, and its autocast settings: float32, or bf16 where the preset asks for it; and bf16 beside
    float32 where bf16 is native and the preset leaves precision to the machine (mixed_precision auto trains bf16
    there)."""
    from ..hardware import bf16_native

    native = bf16_native("cpu")
    if plan.train_bf16 and not native:
        table.notes.append(
            "the preset asks for bf16 autocast, which this CPU would emulate (no avx512_bf16/AMX): "
            "measured in float32, as binlat train would refuse bf16 here"
        )
        return replace(plan, train_bf16=False), [False]
    if plan.train_bf16:
        return plan, [True]
    return plan, [False, True] if native else [False]


def _run_all(plan: Plan, specs: dict[str, dict[str, Any]], skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    run = {k: s for k, s in specs.items() if k not in skipped}
    if plan.mode == "tiny":  # timings mean nothing here: overlap the workers' start-up
        procs = {k: _run_worker(s) for k, s in run.items()}
        return {k: _collect(p) for k, p in procs.items()}
    return {k: _collect(_run_worker(s)) for k, s in run.items()}


def bench_training(plan: Plan, figures: dict[str, float]) -> Table:
    table = Table(
        "[5/8] Training: one optimiser step of each trainer (fresh subprocess each, for a clean peak)",
        [
            "trainer",
            "precision",
            "params",
            "batch",
            "step",
            "n",
            "images/s",
            "vs float32",
            "share of fp32 peak",
            "peak RSS",
            "RSS growth in steps",
        ],
    )
    plan, precisions = _precisions(plan, table)
    runs = {bf16: {k: train_spec(replace(plan, train_bf16=bf16), k) for k in TRAIN_KINDS} for bf16 in precisions}
    specs = runs[precisions[0]]  # sizes, batches and configs: the same in every precision
    clip = specs["tokenizer"]["config"].get("grad_clip", 1.0)
    table.notes.append(
        f"step = binlat.train's Trainer step on the preset's training configs: the task's loss, "
        f"backward, grad clip (tokenizer {clip:g}), AdamW, EMA update; after 1 warm-up step; random "
        f"images (tokenizer) or random bits + random text features given as precomputed data "
        f"(generators)"
    )
    table.notes.append(
        f"sizes and configs: {plan.shipped_name}; share of fp32 peak = 3 x forward FLOPs (backward as 2 x "
        f"forward, counted on the meta device) / step time / float32 matmul peak (for a bf16 step too: what it "
        f"achieves against the float32 peak)"
    )
    table.notes.append(f"tokenizer loss: {_tokenizer_losses(specs['tokenizer']['config'], plan.train_steps)}")
    compiled = ", ".join(f"{k} {'on' if specs[k]['config'].get('compile', False) else 'off'}" for k in TRAIN_KINDS)
    why = (
        "as the preset's configs"
        if plan.train_compiled
        else "eager here: --quick and --tiny leave compiling out; the recipe compiles the generators' forward, about "
        "1.2x faster steps after a few minutes of compiling: docs/recipe.md"
    )
    table.notes.append(f"compiled training forward: {compiled} ({why})")
    autocast = {
        (False,): "off (float32 steps; this CPU has no native bf16)",
        (True,): "on (the preset asks for it)",
        (False, True): "each trainer twice: float32, then bf16 autocast, which binlat train uses on this CPU "
        "(mixed_precision auto: native bf16); same initial weights, same batch",
    }[tuple(precisions)]
    table.notes.append(
        f"autocast bf16: {autocast}; gradient checkpointing: {'on' if plan.train_checkpointing else 'off'} "
        f"(as the preset's configs); peak RSS = the worker's resident high-water mark over its steps (VmHWM, reset "
        f"once trainer, EMA copy and data were built); growth = peak minus the resident size at that point "
        f"(activations, gradients, optimiser state)"
    )
    # Weights, gradients, AdamW moments and the EMA copy alone need 20 bytes per parameter: skip what cannot fit.
    available = memory_available_mib()
    params = {k: _param_count(s) for k, s in specs.items()}
    skipped = {}
    for kind in specs:
        need = 20 * params[kind] / 2**20
        if need > available:
            skipped[kind] = (
                f"skipped: weights + gradients + AdamW + EMA alone need {need / 1024:.1f} GiB, "
                f"{available / 1024:.1f} GiB available"
            )
    results = {bf16: _run_all(plan, runs[bf16], skipped) for bf16 in precisions}
    for kind in TRAIN_KINDS:
        errors = [] if kind in skipped else [r[kind]["error"] for r in results.values() if "error" in r[kind]]
        if errors and len(errors) == len(results):  # a kind that failed in every precision is skipped whole
            skipped[kind] = errors[0]
    if len(skipped) == len(TRAIN_KINDS):
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    for kind in TRAIN_KINDS:
        batch = specs[kind]["config"]["batch_size"]
        if kind in skipped:
            table.rows.append([kind, "-", f"{params[kind] / 1e6:.1f} M", batch, "-", 0, "-", "-", "-", "-", "-"])
            table.footer.append(f"{kind}: {skipped[kind]}")
            continue
        for bf16 in precisions:
            _row(table, figures, plan, kind, bf16, results, specs[kind], params[kind])
    if len(precisions) == 2:
        _bf16_verdicts(table, figures, plan, skipped)
    return table


def _row(table, figures, plan, kind, bf16, results, spec, params) -> None:
    batch = spec["config"]["batch_size"]
    r = results[bf16][kind]
    precision = "bf16" if bf16 else "float32"
    shown = f"{params / 1e6:.1f} M" if params >= 1e5 else f"{params / 1e3:.1f} K"
    if "error" in r:
        table.rows.append([kind, precision, shown, batch, "-", 0, "-", "-", "-", "-", "-"])
        table.footer.append(f"{kind} ({precision}): {r['error']}")
        return
    med = statistics.median(r["times"])
    if r["peak_source"] != "VmHWM":
        table.footer.append(f"{kind}: no /proc/self/clear_refs, so peak is ru_maxrss (may include start-up)")
    flops = training_step_flops(kind, spec["config"]["model"], batch, plan.text_length)
    share = None if flops is None else flops / med / peak_flops(plan, figures)
    compared = bf16 and False in results  # a bf16 row beside a float32 one: its figures get their own keys
    key = f"train_{kind}_bf16" if compared else f"train_{kind}"
    versus = "-"
    if compared and "error" not in results[False][kind]:
        speedup = statistics.median(results[False][kind]["times"]) / med
        figures[f"{key}_speedup"] = speedup
        versus = f"{speedup:.2f}x"
        f32, low = results[False][kind]["losses"][-1], r["losses"][-1]
        figures[f"{key}_loss_rel_diff"] = abs(low - f32) / max(abs(f32), 1e-12)
    table.rows.append(
        [
            kind,
            precision,
            shown,
            batch,
            fmt_s(med),
            len(r["times"]),
            f"{batch / med:.1f}",
            versus,
            "n/a" if share is None else f"{100 * share:.1f} %",
            f"{r['peak_rss_mib']:.0f} MiB",
            f"{r['peak_rss_mib'] - r['before_rss_mib']:.0f} MiB",
        ]
    )
    if share is not None:
        figures[f"{key}_peak_fraction"] = share
    figures[f"{key}_images_per_s"] = batch / med
    figures[f"{key}_step_s"] = med
    figures[f"{key}_peak_rss_mib"] = r["peak_rss_mib"]
    figures[f"{key}_rss_growth_mib"] = r["peak_rss_mib"] - r["before_rss_mib"]


def _bf16_verdicts(table: Table, figures: dict[str, float], plan: Plan, skipped: dict[str, str]) -> None:
    """Issue 30's bf16 targets where bf16 is native: images/s >= 2x float32's, the same losses to 1 %."""
    for kind in TRAIN_KINDS:
        if f"train_{kind}_bf16_speedup" not in figures:
            continue
        table.footer.append(target(figures[f"train_{kind}_bf16_speedup"], 2, f"{kind} bf16 images/s vs float32"))
        diff = figures[f"train_{kind}_bf16_loss_rel_diff"]
        table.footer.append(
            f"{kind}: loss after {plan.train_steps + 1} steps, bf16 vs float32 (same weights and batch): "
            f"{100 * diff:.2f} % apart (target <= 1 %: {'met' if diff <= 0.01 else 'NOT met'})"
        )


# --- the worker: python -m binlat.bench --train-worker SPEC_JSON -------------------------------------------
def _task_factory(spec: dict[str, Any]):
    """Generators: a GeneratorTask as it trains on `binlat precompute` output, without the frozen tokenizer and text
    encoder it loads for raw images (the bench has neither, and a text encoder of the preset's width may not exist
    here); its loss, the part that is timed, is binlat train's own. The tokenizer: binlat train's task (None)."""
    if spec["kind"] == "tokenizer":
        return None
    from ..train.tasks import GeneratorTask

    text_length = int(spec["text_length"])

    def precomputed_generator_task(cfg, device):
        c = cfg.model_config()  # the plan's model names the token grid and the text width
        uncond = precomputed_text(text_features(1, c.num_layers, c.text_dim, text_length, UNCOND_REAL, 2))
        return GeneratorTask(cfg, device, uncond=uncond)

    return precomputed_generator_task


def precomputed_text(features) -> dict[str, torch.Tensor]:
    """Text features as `binlat precompute` stores them: [N, layers, L, D] float16 states and a [N, L] mask."""
    return {"text": torch.stack(features.layers, 1).half(), "text_mask": features.mask}


def _random_batch(task, cfg, text_length: int) -> dict[str, Any]:
    """One collated batch of random data of the task's shapes, as the Trainer's data loader gives it."""
    n, c = cfg.batch_size, task.model_config
    rng = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {"index": torch.arange(n), "caption": [""] * n}
    if cfg.kind == "tokenizer":
        batch["image"] = torch.rand(n, c.in_channels, c.image_size, c.image_size, generator=rng) * 2 - 1
        return batch
    batch["bits"] = (torch.rand(n, c.num_tokens, c.num_bits, generator=rng) < 0.5).float()
    return {**batch, **precomputed_text(text_features(n, c.num_layers, c.text_dim, text_length))}


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, then `steps` timed Trainer steps; the resident peak over the timed steps."""
    from ..config import config_from_dict
    from ..train.config import TrainConfig
    from ..train.engine import Trainer

    torch.set_num_threads(int(spec["threads"]))
    cfg = config_from_dict(TrainConfig, spec["config"], "bench training spec")
    with tempfile.TemporaryDirectory(prefix="binlat-bench-") as run_dir:
        with warnings.catch_warnings():
            # No trackers is what the bench wants (nothing written per step); accelerate warns about it.
            warnings.filterwarnings("ignore", message=".*no supported trackers", category=UserWarning)
            trainer = Trainer(cfg, run_dir, task_factory=_task_factory(spec))
        try:
            batch = _random_batch(trainer.task, cfg, int(spec["text_length"]))
            batches = iter(lambda: dict(batch), None)  # endless; a fresh dict each time, as train_step pops from it
            peak = PeakRSS()  # model, data and EMA copy built; the optimiser state comes with the first step
            trainer.train_step(batches)  # warm-up
            times, losses = [], []
            for _ in range(int(spec["steps"])):
                t0 = time.perf_counter()
                metrics = trainer.train_step(batches)
                times.append(time.perf_counter() - t0)
                losses.append(float("nan") if metrics is None else metrics["loss"])
            model = trainer.acc.unwrap_model(trainer.model)
            return {
                "times": times,
                "losses": losses,
                "peak_rss_mib": peak.peak_mib(),
                "before_rss_mib": peak.before_mib,
                "peak_source": peak.source,
                "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        finally:
            trainer.close()
