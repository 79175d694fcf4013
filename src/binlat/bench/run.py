"""The driver: the header, then each comparison's table, and every figure as one JSON object."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..eval.report import render_table
from .efficiency import bench_bf16, bench_codec, bench_efficiency
from .generation import bench_ar, bench_e2e, bench_tokens
from .harness import CpuLoad, Table, cpu_model, hardware_report
from .plan import Plan, make_plan
from .throughput import bench_throughput
from .training import bench_training

COMPARISONS: tuple[tuple[str, Callable[[Plan, dict[str, float]], Table]], ...] = (
    ("ar", bench_ar),
    ("tokens", bench_tokens),
    ("e2e", bench_e2e),
    ("efficiency", bench_efficiency),
    ("training", bench_training),
    ("tokenizer", bench_codec),
    ("bf16", bench_bf16),
    ("throughput", bench_throughput),
)


def run_bench(
    preset: str = "shapes-64",
    quick: bool = False,
    tiny: bool = False,
    json_path: str | None = None,
    out: Callable[[str], None] = print,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the comparisons, print one table each, return (and optionally write as JSON) every figure.

    A comparison that fails prints its error in place of its table; the others still run. `failed` in the result
    lists them."""
    plan = make_plan(preset, quick=quick, tiny=tiny)
    if json_path and not Path(json_path).resolve().parent.is_dir():
        raise ValueError(f"--json {json_path}: folder {Path(json_path).resolve().parent} does not exist")
    started = time.perf_counter()
    header = [
        f"binlat bench: preset {preset}, mode {plan.mode}",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}; float32 unless noted; inference_mode",
        "each time is the median of n timed runs after warm-up; each ratio is a ratio of medians",
    ]
    if hasattr(os, "getloadavg"):
        header.append(
            f"load average at start: {os.getloadavg()[0]:.2f} (other work on this machine slows what "
            f"is measured; each table says how busy the other processes kept the CPUs)"
        )
    hardware = hardware_report(plan)
    header.append(
        f"hardware: {hardware['model']}; flags {', '.join(hardware['flags']) or 'none of note'}; "
        f"{hardware['threads']} threads; matmul peak float32 {hardware['matmul_peak_fp32_gflops']:.1f} "
        f"GFLOP/s, bfloat16 {hardware['matmul_peak_bf16_gflops']:.1f} GFLOP/s "
        f"({'native' if hardware['bf16_native'] else 'emulated: bf16 rows are skipped'})"
    )
    header += plan.notes
    out("\n".join(header))
    figures: dict[str, float] = {}
    tables: list[dict[str, Any]] = []
    failed: list[str] = []
    for name, fn in COMPARISONS:
        if only and name not in only:
            continue
        t0, load = time.perf_counter(), CpuLoad()
        try:
            with torch.inference_mode():
                table = fn(plan, figures)
        except Exception as e:  # noqa: BLE001 — one broken comparison must not hide the others
            failed.append(name)
            number = [n for n, _ in COMPARISONS].index(name) + 1
            table = Table(
                f"[{number}/{len(COMPARISONS)}] {name}: FAILED",
                ["error"],
                [[f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"]],
            )
        other = load.other_cores()
        busy = "" if other is None else f"; meanwhile other processes kept {other:.2f} of {os.cpu_count()} CPUs busy"
        table.footer.append(f"({time.perf_counter() - t0:.1f} s{busy})")
        if other is not None:
            figures[f"other_cpu_load_{name}"] = other
        out("")
        out(render_table(table.to_dict(), indent="  "))
        tables.append(table.to_dict())
    wall = time.perf_counter() - started
    out(f"\ntotal wall time: {wall:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    result: dict[str, Any] = dict(figures)
    result["hardware"] = hardware
    result["meta"] = {
        "preset": preset,
        "mode": plan.mode,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "notes": plan.notes,
        "wall_s": wall,
        "failed": failed,
        "e2e_tokenizer": plan.e2e_tokenizer_name if plan.e2e_tokenizer else "preset",
        "shipped": plan.shipped_name,
    }
    result["tables"] = tables
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
