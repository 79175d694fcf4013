"""What this machine computes natively, so that slow precisions are refused instead of silently emulated.

PyTorch runs bfloat16 on any CPU, but without avx512_bf16 or AMX it emulates the matmuls: on an AVX2-only
AMD EPYC a bfloat16 matmul ran at ~0.8 GFLOP/s against 107 GFLOP/s in float32 (~130x slower). On Xeons with
avx512_bf16 or AMX it is native and faster than float32. `BINLAT_ASSUME_BF16=1` (or `0`) overrides the CPU
check: for tests, and for virtual machines that hide the flags from /proc/cpuinfo.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

ASSUME_BF16_ENV = "BINLAT_ASSUME_BF16"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags under which oneDNN runs bfloat16 matmuls natively
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CPUInfo:
    model: str  # e.g. "Intel(R) Xeon(R) Platinum 8480+", "AMD EPYC"
    flags: tuple[str, ...]  # the REPORTED_FLAGS this CPU has, in that order
    threads: int  # logical CPUs this process may run on
    cores: int | None  # physical cores (psutil, when installed), else None
    source: str  # where model and flags came from: "/proc/cpuinfo" or "platform"

    @property
    def bf16_native(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "flags": list(self.flags),
            "threads": self.threads,
            "cores": self.cores,
            "source": self.source,
            "bf16_native": self.bf16_native,
        }


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """Model name and flags of the first processor listed in /proc/cpuinfo text (all processors match)."""
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))  # a container may get fewer CPUs than the host has
    except AttributeError:
        return os.cpu_count() or 1


def _physical_cores() -> int | None:
    try:
        import psutil  # optional: used only when already installed
    except ImportError:
        return None
    return psutil.cpu_count(logical=False)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CPUInfo:
    model: str | None = None
    flags: set[str] = set()
    source = "platform"
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
        source = str(CPUINFO)
    except OSError:  # not Linux
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return CPUInfo(
        model=model,
        flags=tuple(f for f in REPORTED_FLAGS if f in flags),
        threads=_threads(),
        cores=_physical_cores(),
        source=source,
    )


def _assumed_bf16() -> bool | None:
    value = os.environ.get(ASSUME_BF16_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ASSUME_BF16_ENV} must be 1 or 0, got {value!r}")
    return value == "1"


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 runs at full speed on `device`: CUDA devices as torch reports them; CPUs with
    avx512_bf16 or AMX (or as BINLAT_ASSUME_BF16 says); other accelerators are trusted."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    assumed = _assumed_bf16()
    return cpu_info().bf16_native if assumed is None else assumed


def require_bf16(device: str | torch.device, what: str, fix: str = "use float32") -> None:
    """Raise a one-line ValueError when bfloat16 would be emulated on `device`; `what` names the job."""
    if bf16_native(device):
        return
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "CUDA (not available here)"
        raise ValueError(f"{what} needs a GPU with bfloat16 support; {name} has none: {fix}")
    raise ValueError(
        f"{what} needs a CPU with native bf16 (avx512_bf16 or AMX); this {cpu_info().model} has "
        f"neither, so it would run ~100x slower: {fix} (or set {ASSUME_BF16_ENV}=1 to run it anyway)"
    )
