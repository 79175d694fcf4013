"""The timing harness: medians after warm-up, the machine's matmul peak and load, memory probes, table cells."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch

from .plan import Timing

if TYPE_CHECKING:
    from .plan import Plan


# --- timing -----------------------------------------------------------------------------------------------------
@dataclass
class Measured:
    times: list[float]
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def n(self) -> int:
        return len(self.times)


def measure(
    fn: Callable[[], Any], timing: Timing, warmup: Callable[[], Any] | None = None, max_runs: int | None = None
) -> Measured:
    """Warm up (with `warmup` if given, else fn itself), then time fn repeatedly; keep the last result."""
    for _ in range(timing.warmup):
        (warmup or fn)()
    times: list[float] = []
    result = None
    limit = timing.max_runs if max_runs is None else min(max_runs, timing.max_runs)
    start = time.perf_counter()
    while len(times) < limit:
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= timing.min_runs and time.perf_counter() - start >= timing.budget_s:
            break
    return Measured(times, result)


def matmul_peak(size: int, dtype: torch.dtype, timing: Timing, runs: int = 7) -> tuple[float, Measured]:
    """Dense matmul FLOP/s: median time of a size x size @ size x size product (2 n^3 FLOPs)."""
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=rng).to(dtype)
    b = torch.randn(size, size, generator=rng).to(dtype)
    m = measure(
        lambda: torch.matmul(a, b),
        replace(
            timing,
            warmup=max(2, timing.warmup),
            min_runs=min(runs, 3),
            max_runs=max(runs, timing.max_runs),
            budget_s=2.0,
        ),
    )
    return 2 * size**3 / m.median, m


MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side prints start/stop lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def matmul_time_split(fn: Callable[[], Any]) -> tuple[float, float] | None:
    """(seconds inside matrix-product kernels, seconds in every operator) of one profiled call of fn."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        inside = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
        return (inside, total) if total > 0 else None
    except Exception:  # noqa: BLE001 — a diagnostic row, not a figure anyone depends on
        return None


def operator_calls(fn: Callable[[], Any]) -> int | None:
    """How many top-level aten operators one call of fn runs (after one unprofiled warm-up call)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
    except Exception:  # noqa: BLE001 — a diagnostic, not a figure anyone depends on
        return None


# --- the machine ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    from ..hardware import cpu_info

    return cpu_info().model


def hardware_report(plan: Plan) -> dict[str, Any]:
    """The CPU, the flags that decide its speed, threads, and its measured float32 and bfloat16 matmul peaks (the
    bf16 one on a small product where bf16 is emulated, which would otherwise take seconds per product)."""
    from ..hardware import bf16_native, cpu_info

    native = bf16_native("cpu")
    fp32, _ = matmul_peak(plan.peak_size, torch.float32, plan.timing)
    bf16_size = plan.peak_size if native else min(plan.peak_size, 256)
    bf16, _ = matmul_peak(bf16_size, torch.bfloat16, plan.timing)
    return {
        **cpu_info().as_dict(),
        "torch_threads": torch.get_num_threads(),
        "bf16_native": native,
        "matmul_peak_fp32_gflops": fp32 / 1e9,
        "matmul_peak_bf16_gflops": bf16 / 1e9,
        "matmul_peak_sizes": {"float32": plan.peak_size, "bfloat16": bf16_size},
    }


class CpuLoad:
    """CPU time the rest of the machine used while we ran: (all CPUs' busy time - this process tree's) / wall.

    On a shared machine other work steals cores from the measured code (with 2 OpenMP threads one busy core
    can halve our speed), so every table reports it."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())

    def other_cores(self) -> float | None:
        wall, busy, own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        if wall <= self.start[0]:
            return None
        return max(0.0, (busy - self.start[1]) - (own - self.start[2])) / (wall - self.start[0])


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    # Not idle, iowait or steal; guest time is already inside user. Fields a platform lacks count as 0.
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def _own_cpu_s() -> float:
    """This process's CPU time and that of its children that have ended (the training workers)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def memory_available_mib() -> float:
    return psutil.virtual_memory().available / 2**20


class PeakRSS:
    """The resident high-water mark of this process from now on, in MiB, and the resident size it started from.

    psutil has no resident high-water mark on Linux (its memory_info has none), and nothing but a write to
    /proc/self/clear_refs resets one, so this is the one place that uses /proc. ru_maxrss is only the fallback:
    Linux carries it across exec, so a worker started by a big parent inherits the parent's peak."""

    def __init__(self) -> None:
        self.before_mib, self.source = rss_mib(), "VmHWM"
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
        except OSError:
            self.before_mib, self.source = _ru_maxrss_mib(), "ru_maxrss"

    def peak_mib(self) -> float:
        if self.source == "VmHWM":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return _ru_maxrss_mib()


def _ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- table cells ------------------------------------------------------------------------------------------------
def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_x(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def target(value: float, goal: float, what: str) -> str:
    return f"target {what} >= {goal:g}x: {'met' if value >= goal else 'NOT met'} ({fmt_x(value)})"


@dataclass
class Table:
    """One comparison's table as it is built; printed by binlat.eval.report.render_table (notes under the title,
    footer under the rows)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what exactly was measured
    footer: list[str] = field(default_factory=list)  # verdicts, counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "notes": self.notes,
            "columns": self.columns,
            "rows": self.rows,
            "footer": self.footer,
        }
