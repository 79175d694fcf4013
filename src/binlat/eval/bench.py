"""`binlat bench`: speed, efficiency and memory of binlat against the things it claims to beat.

Seven comparisons, all in one process (training in fresh subprocesses, for a clean memory peak), on randomly
initialised networks and random text features of the right shape (a fixed 32-token text with a padding mask), so
no trained weights and no language model are needed:

1. AR decoding, KV-cached vs full recomputation (the release's sampler), with a check that the bits agree.
2. One diffusion-transformer step over 128 binary tokens vs the same network over 1,024 and 4,096 tokens.
3. End to end (20 guided steps + decode) vs a latent-diffusion pipeline of `diffusers` parts of equal transformer
   width and depth (PixArt-style transformer over an 8x-downsampled latent, patch 2, + an SD-style AutoencoderKL).
4. Achieved FLOP/s of a batched diffusion step (FLOPs counted analytically) as a share of measured matmul peak.
5. Images/s and peak resident memory of one training step of each trainer (tokenizer, diffusion, AR).
6. Tokenizer encode and decode throughput.
7. bfloat16 vs float32: the same diffusion step and a full generation, with bit agreement.

Every time is a median over repeated runs after warm-up; every ratio is a ratio of medians. Each table says how
many runs stand behind each figure and what, if anything, was reduced or composed to fit the time budget, and how
busy other processes kept the CPUs meanwhile.

Headline JSON keys (all plain numbers; `--json` also writes every median behind them, and the tables):
`ar_kv_speedup` (recompute / cached time at 128 tokens, batch 1; `ar_kv_speedup_large_batch` at batch 8),
`tokens_128_vs_4096_speedup` (4,096-token step time / 128-token step time), `e2e_512_speedup` and
`e2e_1024_speedup` (latent-diffusion s/image / binlat s/image), `matmul_peak_fraction` (achieved / peak FLOP/s),
`bf16_speedup` (float32 / bfloat16 time of a full generation; `bf16_step_speedup` for the batched step).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

REQUIRED_KEYS = ("ar_kv_speedup", "tokens_128_vs_4096_speedup", "e2e_512_speedup", "e2e_1024_speedup",
                 "matmul_peak_fraction", "bf16_speedup")
PAPER_TOKENS = 128          # the paper's token count at 512 px (comparisons 2-4 use it with the preset's width)
TEXT_LENGTH = 32            # the fixed text: 32 positions, left-padded
TEXT_REAL, UNCOND_REAL = 12, 2  # real (unmasked) tokens of the prompt and of the empty prompt


# --- presets and modes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Model sizes and training batch sizes of one family of configs (mirrors configs/*/<name>.json)."""

    name: str
    tokenizer: dict[str, Any]   # TokenizerConfig fields
    generator: dict[str, Any]   # GeneratorConfig fields at the preset's own token count
    image_size: int
    tokenizer_batch: int
    generator_batch: int
    mixed_precision: bool = False      # training configs ask for bf16 autocast
    grad_checkpointing: bool = False


PRESETS: dict[str, Preset] = {
    "shapes-64": Preset(
        name="shapes-64",
        tokenizer=dict(patch_size=8, num_tokens=32, num_bits=32, encoder_layers=4, encoder_heads=3,
                       encoder_head_dim=64, decoder_layers=6, decoder_heads=3, decoder_head_dim=64,
                       rope_axes_dims=(16, 24, 24), downsample_after=(), upsample_after=(), image_size=64),
        generator=dict(num_tokens=32, num_bits=32, text_dim=384, num_layers=6, num_heads=4, head_dim=64),
        image_size=64, tokenizer_batch=32, generator_batch=64),
    "paper-512": Preset(
        name="paper-512",
        tokenizer=dict(patch_size=16, num_tokens=128, num_bits=64, encoder_layers=12, encoder_heads=12,
                       encoder_head_dim=64, decoder_layers=16, decoder_heads=16, decoder_head_dim=64,
                       rope_axes_dims=(8, 28, 28), downsample_after=(7,), upsample_after=(7,),
                       rope_reference_size=512, image_size=512),
        generator=dict(num_tokens=128, num_bits=64, text_dim=2048, num_layers=16, num_heads=16, head_dim=128),
        image_size=512, tokenizer_batch=256, generator_batch=4096, mixed_precision=True, grad_checkpointing=True),
}

# --tiny: widths small enough that every code path runs in seconds (the test suite's mode).
_TINY_TOKENIZER = dict(patch_size=8, num_tokens=16, num_bits=8, encoder_layers=1, encoder_heads=1,
                       encoder_head_dim=16, decoder_layers=1, decoder_heads=1, decoder_head_dim=16,
                       rope_axes_dims=(4, 6, 6), downsample_after=(), upsample_after=(), image_size=32)
_TINY_GENERATOR = dict(num_tokens=16, num_bits=8, text_dim=24, num_layers=2, num_heads=2, head_dim=16)


@dataclass(frozen=True)
class Timing:
    """How hard to time: warm-up calls, then repeat until max_runs, or stop after min_runs once budget_s is spent."""

    warmup: int
    min_runs: int
    max_runs: int
    budget_s: float


@dataclass
class Plan:
    """Everything a run measures, resolved from a preset and a mode; `notes` record every reduction made."""

    preset: Preset
    mode: str                       # full | quick | tiny
    timing: Timing
    tokenizer: dict[str, Any]
    generator: dict[str, Any]       # preset's token count
    e2e_tokenizer: dict[str, Any] | None = None  # the decoder of table 3, when it differs from `tokenizer`
    text_length: int = TEXT_LENGTH
    paper_tokens: int = PAPER_TOKENS
    ar_tokens: tuple[int, ...] = (PAPER_TOKENS,)
    ar_batches: tuple[int, int] = (1, 8)
    token_counts: tuple[int, int, int] = (128, 1024, 4096)
    e2e_sizes: tuple[int, int] = (512, 1024)
    steps: int = 20
    guidance: float = 7.5
    e2e_composed: tuple[int, ...] = ()  # sizes whose baseline image = steps x median step + one decode
    small_warmup: bool = False      # expensive single runs warm up on a smaller input of the same code path
    vae: dict[str, Any] = field(default_factory=dict)
    efficiency_batch: int = 64
    wide_check: dict[str, int] | None = None  # the step again at another width (generator overrides + batch)
    peak_size: int = 2048
    train_batches: dict[str, int] = field(default_factory=dict)
    train_steps: int = 3
    train_bf16: bool = False
    train_checkpointing: bool = False
    codec_batch: int = 32
    bf16_batch: int = 8
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> str:
        g = self.generator
        return f"{g['num_layers']}L x {g['num_heads']}H x {g['head_dim']} (dim {g['num_heads'] * g['head_dim']})"


SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)


def make_plan(preset: str = "shapes-64", quick: bool = False, tiny: bool = False) -> Plan:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if quick and tiny:
        raise ValueError("--quick and --tiny are different modes; give one")
    p = PRESETS[preset]
    if tiny:
        return Plan(preset=p, mode="tiny", timing=Timing(1, 1, 1, 0.0), tokenizer=dict(_TINY_TOKENIZER),
                    generator=dict(_TINY_GENERATOR), ar_tokens=(16,), ar_batches=(1, 2), steps=2,
                    e2e_composed=(1024,), small_warmup=True,
                    vae=dict(SD_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
                    efficiency_batch=4, peak_size=256,
                    wide_check=dict(num_layers=1, num_heads=4, head_dim=16, batch=2),
                    train_batches={"tokenizer": 2, "diffusion": 4, "ar": 4},
                    train_steps=1, codec_batch=2, bf16_batch=2,
                    notes=["TINY mode: tiny widths (generator 2L x 2H x 16, tokenizer 1+1 blocks of 16, VAE 8 "
                           "channels), 2 diffusion steps, 1 run each; exercises every code path, figures mean "
                           "nothing"])
    plan = Plan(preset=p, mode="quick" if quick else "full",
                timing=Timing(1, 1, 3, 3.0) if quick else Timing(1, 3, 10, 30.0),
                tokenizer=dict(p.tokenizer), generator=dict(p.generator), vae=dict(SD_VAE),
                efficiency_batch=min(p.generator_batch, 64),
                train_batches={"tokenizer": p.tokenizer_batch, "diffusion": p.generator_batch,
                               "ar": p.generator_batch},
                train_bf16=p.mixed_precision, train_checkpointing=p.grad_checkpointing,
                codec_batch=min(p.tokenizer_batch, 32), e2e_composed=(512, 1024) if quick else (),
                small_warmup=quick,
                train_steps=2 if quick else 5)
    paper_width = PRESETS["paper-512"].generator
    if p.generator["num_heads"] * p.generator["head_dim"] != paper_width["num_heads"] * paper_width["head_dim"]:
        plan.wide_check = dict(num_layers=1, num_heads=paper_width["num_heads"], head_dim=paper_width["head_dim"],
                               text_dim=paper_width["text_dim"], batch=16)
    if p.generator["num_tokens"] != PAPER_TOKENS and not quick:
        plan.ar_tokens = (p.generator["num_tokens"], PAPER_TOKENS)
    if quick:
        plan.notes.append("QUICK mode: up to 3 timed runs per figure (1 for runs over 3 s); expensive single runs "
                          "warm up on a smaller input; the latent-diffusion baseline image is composed as "
                          "20 x (median guided step) + one VAE decode")
    if preset == "paper-512":
        # The paper's sizes do not fit this machine's memory for training, nor its time budget for generation.
        plan.train_batches = {"tokenizer": 4, "diffusion": 16, "ar": 16}
        plan.notes.append("paper-512: training runs micro-batches (tokenizer 4, generators 16 of the preset's "
                          f"{p.tokenizer_batch} / {p.generator_batch}); images/s is per micro-batch step")
        plan.efficiency_batch, plan.codec_batch, plan.bf16_batch = 16, 4, 2
        if quick:
            plan.e2e_tokenizer = dict(plan.tokenizer)
            plan.generator.update(num_layers=2)
            plan.tokenizer.update(encoder_layers=2, decoder_layers=2, downsample_after=(0,), upsample_after=(0,))
            plan.notes.append("paper-512 QUICK: depth reduced to 2 of 16 blocks for the generators (and the PixArt "
                              "baseline), to 2+2 of 12+16 blocks for the tokenizer in tables 5-7 (widths as in the "
                              "paper); table 3 decodes with the full 16-block tokenizer decoder, against the full "
                              "SD VAE")
    return plan


# --- timing, machine ------------------------------------------------------------------------------------------
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


def measure(fn: Callable[[], Any], timing: Timing, warmup: Callable[[], Any] | None = None,
            max_runs: int | None = None) -> Measured:
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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


class CpuLoad:
    """CPU time the rest of the machine used while we ran: (all CPUs' busy time - this process tree's) / wall.

    On a shared machine other work steals cores from the measured code (with 2 OpenMP threads one busy core
    can halve our speed), so every table reports it. None where /proc/stat is unavailable."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())

    def other_cores(self) -> float | None:
        wall, busy, own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        if busy is None or self.start[1] is None or wall <= self.start[0]:
            return None
        return max(0.0, (busy - self.start[1]) - (own - self.start[2])) / (wall - self.start[0])


def _machine_busy_s() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def matmul_peak(size: int, dtype: torch.dtype, timing: Timing, runs: int = 7) -> tuple[float, Measured]:
    """Dense matmul FLOP/s: median time of a size x size @ size x size product (2 n^3 FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    m = measure(lambda: torch.matmul(a, b), replace(timing, warmup=max(2, timing.warmup), min_runs=min(runs, 3),
                                                   max_runs=max(runs, timing.max_runs), budget_s=2.0))
    return 2 * size ** 3 / m.median, m


def hardware_report(plan: Plan) -> dict[str, Any]:
    """The CPU, the flags that decide its speed, threads, and its measured float32 and bfloat16 matmul peaks (the
    bf16 one on a small product where bf16 is emulated, which would otherwise take seconds per product)."""
    from ..hardware import bf16_native, cpu_info
    native = bf16_native("cpu")
    fp32, _ = matmul_peak(plan.peak_size, torch.float32, plan.timing)
    bf16_size = plan.peak_size if native else min(plan.peak_size, 256)
    bf16, _ = matmul_peak(bf16_size, torch.bfloat16, plan.timing)
    return {**cpu_info().as_dict(), "torch_threads": torch.get_num_threads(), "bf16_native": native,
            "matmul_peak_fp32_gflops": fp32 / 1e9, "matmul_peak_bf16_gflops": bf16 / 1e9,
            "matmul_peak_sizes": {"float32": plan.peak_size, "bfloat16": bf16_size}}


# --- formatting -------------------------------------------------------------------------------------------------
def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_x(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # printed under the title: what exactly was measured
    footer: list[str] = field(default_factory=list)  # printed under the rows: verdicts, counts

    def render(self) -> str:
        cells = [self.columns] + self.rows
        widths = [max(len(str(r[i])) for r in cells) for i in range(len(self.columns))]
        line = lambda r: "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [self.title] + [f"  {n}" for n in self.notes] + [line(self.columns)]
        out += [line(["-" * w for w in widths])] + [line(r) for r in self.rows] + [f"  {f}" for f in self.footer]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "notes": self.notes, "columns": self.columns, "rows": self.rows,
                "footer": self.footer}


def _target(value: float, goal: float, what: str) -> str:
    return f"target {what} >= {goal:g}x: {'met' if value >= goal else 'NOT met'} ({fmt_x(value)})"


# --- inputs -----------------------------------------------------------------------------------------------------
def text_features(batch: int, layers: int, dim: int, length: int = TEXT_LENGTH, real: int = TEXT_REAL,
                  seed: int = 1):
    """A fixed random 'prompt': one [batch, length, dim] state per layer (the same text in every row), left-padded
    with `real` real tokens at the end."""
    from ..text import TextFeatures
    gen = torch.Generator().manual_seed(seed)
    states = [torch.randn(1, length, dim, generator=gen).expand(batch, -1, -1).contiguous() for _ in range(layers)]
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length - real:] = True
    return TextFeatures(states, mask)


def prompt_pair(plan: Plan, batch: int, layers: int | None = None):
    g = plan.generator
    layers = g["num_layers"] if layers is None else layers
    return (text_features(batch, layers, g["text_dim"], plan.text_length, TEXT_REAL, seed=1),
            text_features(1, layers, g["text_dim"], plan.text_length, UNCOND_REAL, seed=2))


def _gen_config(plan: Plan, **overrides):
    from ..generators import GeneratorConfig
    return GeneratorConfig(**{**plan.generator, **overrides})


def _seeded(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def diffusion_network(config, seed: int = 0) -> torch.nn.Module:
    """A random DiffusionTransformer whose adaLN-Zero layers are random too: freshly initialised they are zero,
    every block is then the identity, and output-level comparisons (bf16 agreement) would only see the
    embedding and output layers. Timing is the same either way."""
    from ..generators import DiffusionTransformer
    net = _seeded(lambda: DiffusionTransformer(config), seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for block in net.blocks:
            block.adaln.linear.weight.copy_(torch.randn(block.adaln.linear.weight.shape, generator=gen) * 0.02)
    return net


# --- FLOP counting ----------------------------------------------------------------------------------------------
def diffusion_step_flops(config, batch: int, text_length: int = TEXT_LENGTH, num_tokens: int | None = None
                         ) -> dict[str, int]:
    """Analytic FLOPs (2 per multiply-add) of one DiffusionTransformer forward on `batch` rows of `num_tokens`
    tokens (default: the config's) with `text_length` text positions (padded ones included: they are computed).

    Counts every matrix product: attention projections (q over image rows; k, v over text + image rows; out),
    attention scores and values, MLP, adaLN modulation, per-block text projections, and the input/timestep/output
    layers. Bias adds, norms, activations and softmax are not counted (they are not matmul work)."""
    n, k, l = batch, config.num_tokens if num_tokens is None else num_tokens, text_length
    d, b, r = config.dim, config.num_bits, config.mlp_ratio
    inner = config.num_heads * config.head_dim
    per_block = {
        "attention projections": 2 * n * (k * d * inner + 2 * (l + k) * d * inner + k * inner * d),
        "attention scores/values": 2 * 2 * n * k * (l + k) * inner,
        "MLP": 2 * 2 * n * k * d * r * d,
        "adaLN": 2 * n * d * 6 * d,
        "text projections": 2 * n * l * config.text_dim * d,
    }
    flops = {name: config.num_layers * v for name, v in per_block.items()}
    flops["adaLN"] += 2 * n * d * 2 * d                                    # output AdaLNContinuous
    flops["embed/timestep/output"] = 2 * n * (k * b * d + d + d * d + k * d * b)
    flops["total"] = sum(flops.values())
    return flops


def counted_flops(fn: Callable[[], Any]) -> int | None:
    """FLOPs of matrix products and convolutions that torch's FlopCounterMode sees while fn runs (None on failure).
    Run on the meta device it costs nothing and counts attention as the products it decomposes into."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 — a missing FLOP formula only costs a column
        return None


# --- 1. AR decoding ---------------------------------------------------------------------------------------------
def bench_ar(plan: Plan, figures: dict[str, float]) -> Table:
    from ..generators import ARTransformer
    from ..processes import ARDecoding
    from ..processes.common import make_generators
    table = Table("[1/7] AR decoding: KV cache vs full recomputation (use_cache=False, the release's algorithm)",
                  ["tokens", "batch", "cached s/img", "per step", "n", "recompute s/img", "n", "speedup",
                   "same bits"])
    table.notes.append(f"ARTransformer {plan.width}, {plan.generator['num_bits']} bits/token, guidance "
                       f"{plan.guidance:g} (cond+uncond rows), temperature 1, seeds 0..batch-1; time per image = "
                       f"median batch time / batch")
    table.notes.append("warm-up: cached = one full run; recompute = its last 2 steps (a prefix fixes the others)")
    for tokens in plan.ar_tokens:
        net = _seeded(lambda: ARTransformer(_gen_config(plan, num_tokens=tokens)))
        for batch in plan.ar_batches:
            cond, uncond = prompt_pair(plan, batch)

            def run(cached: bool, prefix: torch.Tensor | None = None) -> torch.Tensor:
                return ARDecoding(use_cache=cached).sample(net, cond, uncond, make_generators(range(batch)),
                                                           guidance_scale=plan.guidance, prefix=prefix)

            prefix = torch.zeros(batch, max(tokens - 2, 0), plan.generator["num_bits"])
            fast = measure(lambda: run(True), plan.timing)
            slow = measure(lambda: run(False), plan.timing, warmup=lambda: run(False, prefix))
            ratio = slow.median / fast.median
            differ = int((fast.result != slow.result).sum())
            total = fast.result.numel()
            same = "yes" if differ == 0 else f"NO ({differ}/{total} differ)"
            table.rows.append([tokens, batch, fmt_s(fast.median / batch), fmt_s(fast.median / tokens), fast.n,
                               fmt_s(slow.median / batch), slow.n, fmt_x(ratio), same])
            key = f"ar_{tokens}tok_b{batch}"
            figures[f"{key}_cached_s_per_image"] = fast.median / batch
            figures[f"{key}_recompute_s_per_image"] = slow.median / batch
            figures[f"{key}_speedup"] = ratio
            figures[f"{key}_bits_equal_fraction"] = 1 - differ / total
    top = max(plan.ar_tokens)
    figures["ar_kv_speedup"] = figures[f"ar_{top}tok_b{plan.ar_batches[0]}_speedup"]
    figures["ar_kv_speedup_large_batch"] = figures[f"ar_{top}tok_b{plan.ar_batches[1]}_speedup"]
    for batch in plan.ar_batches:
        table.footer.append(_target(figures[f"ar_{top}tok_b{batch}_speedup"], 10, f"speedup at {top} tokens, "
                                                                               f"batch {batch}"))
    table.footer.append("per step = cached batch time / tokens: one token for the whole batch, every block")
    return table


# --- 2. token count ---------------------------------------------------------------------------------------------
def bench_tokens(plan: Plan, figures: dict[str, float]) -> Table:
    from ..processes.common import with_guidance
    counts = plan.token_counts
    net = diffusion_network(_gen_config(plan, num_tokens=max(counts)))
    config = net.config
    cond, uncond = prompt_pair(plan, 1)
    text = with_guidance(cond, uncond, plan.guidance)  # 2 rows: one guided image
    table = Table("[2/7] Token count: one diffusion-transformer step, 128 binary tokens vs 1,024 / 4,096 tokens",
                  ["tokens", "step", "n", "GFLOP", "slower than 128", "FLOP ratio"])
    table.notes.append(f"one DiffusionTransformer {plan.width}, built with num_tokens={max(counts)} (pos_emb, the "
                       f"only size-dependent parameter, is sliced); batch 2 (cond+uncond of one image), "
                       f"{plan.text_length} text positions")
    base = None
    for tokens in counts:
        gen = torch.Generator().manual_seed(tokens)
        x = (torch.rand(2, tokens, config.num_bits, generator=gen) < 0.5).float()
        t = torch.full((2,), 0.5)
        m = measure(lambda: net(x, t, text.layers, text.mask), plan.timing)
        flops = diffusion_step_flops(config, 2, plan.text_length, tokens)["total"]
        base = base or (m.median, flops)
        table.rows.append([tokens, fmt_s(m.median), m.n, f"{flops / 1e9:.2f}", fmt_x(m.median / base[0]),
                           fmt_x(flops / base[1])])
        figures[f"diffusion_step_{tokens}tok_s"] = m.median
        figures[f"diffusion_step_{tokens}tok_flops"] = flops
    figures["tokens_128_vs_1024_speedup"] = figures[f"diffusion_step_{counts[1]}tok_s"] / base[0]
    figures["tokens_128_vs_4096_speedup"] = figures[f"diffusion_step_{counts[2]}tok_s"] / base[0]
    table.footer.append(_target(figures["tokens_128_vs_4096_speedup"], 25, f"{counts[0]}-token step vs "
                                                                        f"{counts[2]}"))
    return table


# --- 3. end to end ----------------------------------------------------------------------------------------------
def _pixart(plan: Plan, latent: int):
    from diffusers import PixArtTransformer2DModel
    g = plan.generator
    return PixArtTransformer2DModel(
        num_attention_heads=g["num_heads"], attention_head_dim=g["head_dim"], in_channels=4, out_channels=4,
        num_layers=g["num_layers"], cross_attention_dim=g["num_heads"] * g["head_dim"], sample_size=latent,
        patch_size=2, caption_channels=g["text_dim"], use_additional_conditions=False)


def _vae(plan: Plan):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**plan.vae)


class LatentDiffusionBaseline:
    """Text -> 20 guided DDIM steps of a PixArt-style transformer on a 4-channel latent -> AutoencoderKL decode."""

    def __init__(self, plan: Plan, size: int, transformer: torch.nn.Module, vae: torch.nn.Module):
        from diffusers import DDIMScheduler
        self.plan, self.latent = plan, size // 8
        self.transformer, self.vae = transformer.eval(), vae.eval()
        self.scheduler = DDIMScheduler(num_train_timesteps=1000)
        self.scheduler.set_timesteps(plan.steps)
        cond, uncond = prompt_pair(plan, 1, layers=1)
        self.text = torch.cat((cond.layers[-1], uncond.layers[-1]))
        self.mask = torch.cat((cond.mask, uncond.mask)).float()

    def noise(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(1, 4, self.latent, self.latent, generator=torch.Generator().manual_seed(seed))

    def step(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.transformer(torch.cat((latents, latents)), encoder_hidden_states=self.text,
                               encoder_attention_mask=self.mask, timestep=t.reshape(1).expand(2),
                               return_dict=False)[0]
        cond, uncond = eps.chunk(2)
        eps = uncond + self.plan.guidance * (cond - uncond)
        return self.scheduler.step(eps, t, latents).prev_sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def __call__(self, seed: int = 0) -> torch.Tensor:
        latents = self.noise(seed)
        for t in self.scheduler.timesteps:
            latents = self.step(latents, t)
        return self.decode(latents)


def bench_e2e(plan: Plan, figures: dict[str, float]) -> Table:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise RuntimeError("the latent-diffusion baseline needs diffusers: pip install 'binlat[bench]'") from None
    from ..processes import BernoulliDiffusion
    from ..processes.common import make_generators
    from ..tokenizer import BinaryTokenizer, TokenizerConfig
    tok_cfg = TokenizerConfig(**(plan.e2e_tokenizer or plan.tokenizer))
    gen_cfg = _gen_config(plan, num_tokens=plan.paper_tokens)
    table = Table("[3/7] End to end: binlat vs a latent-diffusion pipeline of diffusers parts (seconds per image)",
                  ["size", "binlat s/img", "n", "latent-diff s/img", "n", "speedup", "binlat GFLOP", "LDM GFLOP",
                   "FLOP ratio"])
    v = plan.vae
    table.notes.append(f"binlat: BernoulliDiffusion.sample ({plan.steps} steps, guidance {plan.guidance:g}) with "
                       f"DiffusionTransformer {plan.width} over {plan.paper_tokens} tokens x {gen_cfg.num_bits} bits"
                       f", then BinaryTokenizer.decode at the size ({plan.preset.name} tokenizer: patch "
                       f"{tok_cfg.patch_size}, decoder {tok_cfg.decoder_layers}L x {tok_cfg.decoder_dim})")
    table.notes.append(f"latent diffusion: PixArtTransformer2DModel of the same layers/heads/head_dim (+ its "
                       f"cross-attention), patch 2, 4 channels, over the 8x-downsampled latent; {plan.steps} DDIM "
                       f"steps with guidance (batch 2); AutoencoderKL decoder, channels "
                       f"{tuple(v['block_out_channels'])} x {v['layers_per_block']} layers/block "
                       f"({'SD' if v == SD_VAE else 'reduced'} config)")
    if plan.e2e_composed:
        table.notes.append(f"latent diffusion s/img at {', '.join(f'{z} px' for z in plan.e2e_composed)} COMPOSED: "
                           f"{plan.steps} x median guided step (n runs) + one VAE decode (after a 64 px warm-up); "
                           f"binlat images are complete runs")
    if plan.small_warmup:
        table.notes.append(f"binlat warm-up: one full image at {8 * tok_cfg.size_multiple} px (same code path), "
                           f"then timed runs at the size")
    table.notes.append("GFLOP: matrix products and convolutions per image (torch FlopCounterMode on the meta "
                       "device); both sides random init, float32, same threads")
    gen = diffusion_network(gen_cfg)
    tokenizer = _seeded(lambda: BinaryTokenizer(tok_cfg))
    cond, uncond = prompt_pair(plan, 1)
    process = BernoulliDiffusion(prediction=gen_cfg.prediction)
    vae = _seeded(lambda: _vae(plan), 1)
    warm_size = 8 * tok_cfg.size_multiple if plan.small_warmup else None

    def sample() -> torch.Tensor:
        return process.sample(gen, cond, uncond, make_generators([0]), num_steps=plan.steps,
                              guidance_scale=plan.guidance)

    def binlat_image(size: int) -> torch.Tensor:
        return tokenizer.decode(sample(), size, size)

    sampling = measure(sample, plan.timing)
    figures["e2e_binlat_sampling_s"] = sampling.median

    for size in plan.e2e_sizes:
        tokenizer.check_size(size, size)
        baseline = LatentDiffusionBaseline(plan, size, _seeded(lambda: _pixart(plan, size // 8), 2), vae)
        ours = measure(lambda: binlat_image(size), plan.timing,
                       warmup=(lambda: binlat_image(warm_size)) if warm_size else None)
        if size in plan.e2e_composed:
            latents, t = baseline.noise(), baseline.scheduler.timesteps[0]
            step = measure(lambda: baseline.step(latents, t), plan.timing)
            small = torch.zeros(1, 4, 8, 8)
            decode = measure(lambda: baseline.decode(latents), plan.timing, warmup=lambda: baseline.decode(small),
                             max_runs=1)
            theirs_s, theirs_n = plan.steps * step.median + decode.median, f"{step.n}+{decode.n}"
            figures[f"e2e_{size}_ldm_step_s"] = step.median
            figures[f"e2e_{size}_ldm_decode_s"] = decode.median
        else:
            theirs = measure(baseline, plan.timing, max_runs=3)
            theirs_s, theirs_n = theirs.median, theirs.n
        ratio = theirs_s / ours.median
        ours_flops, theirs_flops = e2e_flops(plan, gen_cfg, tok_cfg, size)
        flop_ratio = theirs_flops / ours_flops if ours_flops and theirs_flops else None
        gf = lambda f: "n/a" if f is None else f"{f / 1e9:.1f}"  # noqa: E731
        table.rows.append([f"{size} px", fmt_s(ours.median), ours.n, fmt_s(theirs_s), theirs_n, fmt_x(ratio),
                           gf(ours_flops), gf(theirs_flops), "n/a" if flop_ratio is None else fmt_x(flop_ratio)])
        table.footer.append(f"{size} px: binlat = sampling {fmt_s(sampling.median)} (timed alone, n={sampling.n}) "
                            f"+ decode ~{fmt_s(max(ours.median - sampling.median, 0.0))}")
        figures[f"e2e_{size}_binlat_s_per_image"] = ours.median
        figures[f"e2e_{size}_ldm_s_per_image"] = theirs_s
        figures[f"e2e_{size}_speedup"] = ratio
        if flop_ratio is not None:
            figures[f"e2e_{size}_flop_ratio"] = flop_ratio
    small, large = plan.e2e_sizes
    table.footer.append(_target(figures[f"e2e_{small}_speedup"], 6, f"at {small} px"))
    table.footer.append(_target(figures[f"e2e_{large}_speedup"], 20, f"at {large} px"))
    return table


def e2e_flops(plan: Plan, gen_cfg, tok_cfg, size: int) -> tuple[int | None, int | None]:
    """Per-image FLOPs of both pipelines, counted on the meta device (no memory, no time)."""
    from ..generators import DiffusionTransformer
    from ..tokenizer import BinaryTokenizer
    with torch.device("meta"):
        def ours() -> None:
            net, tok = DiffusionTransformer(gen_cfg), BinaryTokenizer(tok_cfg)
            text = [torch.zeros(2, plan.text_length, gen_cfg.text_dim)] * gen_cfg.num_layers
            mask = torch.ones(2, plan.text_length, dtype=torch.bool)
            x = torch.zeros(2, gen_cfg.num_tokens, gen_cfg.num_bits)
            for _ in range(plan.steps):
                net(x, torch.zeros(2), text, mask)
            tok.decode(torch.zeros(1, gen_cfg.num_tokens, gen_cfg.num_bits), size, size)

        def theirs() -> None:
            net, vae = _pixart(plan, size // 8), _vae(plan)
            x = torch.zeros(2, 4, size // 8, size // 8)
            text = torch.zeros(2, plan.text_length, plan.generator["text_dim"])
            for _ in range(plan.steps):
                net(x, encoder_hidden_states=text, encoder_attention_mask=torch.ones(2, plan.text_length),
                    timestep=torch.zeros(2), return_dict=False)
            vae.decode(torch.zeros(1, 4, size // 8, size // 8))

        return counted_flops(ours), counted_flops(theirs)


# --- 4. hardware efficiency -------------------------------------------------------------------------------------
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


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


def _efficiency_step(plan: Plan, batch: int, **overrides):
    """The batched step of tables 4 and 7: (config, network, inputs) at the paper's token count."""
    config = _gen_config(plan, num_tokens=plan.paper_tokens, **overrides)
    net = diffusion_network(config)
    cond = text_features(batch, config.num_layers, config.text_dim, plan.text_length)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, config.num_tokens, config.num_bits, generator=gen) < 0.5).float()
    t = torch.rand(batch, generator=gen)
    return config, net, (x, t, cond.layers, cond.mask)


def bench_efficiency(plan: Plan, figures: dict[str, float]) -> Table:
    batch = plan.efficiency_batch
    config, net, inputs = _efficiency_step(plan, batch)
    step = lambda: net(*inputs)  # noqa: E731
    # The peak is sampled right before and right after the step and pooled, so both see the same machine.
    _, before = matmul_peak(plan.peak_size, torch.float32, plan.timing)
    m = measure(step, plan.timing)
    _, after = matmul_peak(plan.peak_size, torch.float32, plan.timing)
    peak_m = Measured(before.times + after.times)
    peak = 2 * plan.peak_size ** 3 / peak_m.median
    flops = diffusion_step_flops(config, batch, plan.text_length)
    achieved = flops["total"] / m.median
    fraction = achieved / peak
    table = Table("[4/7] Hardware efficiency: achieved FLOP/s of a batched diffusion step vs measured matmul peak",
                  ["item", "value"])
    table.notes.append(f"DiffusionTransformer {plan.width}, batch {batch} x {config.num_tokens} tokens, "
                       f"{plan.text_length} text positions, float32; peak = median of a {plan.peak_size}x"
                       f"{plan.peak_size} float32 torch.matmul ({peak_m.n} runs, half before and half after the "
                       f"step) in this process")
    for name, value in flops.items():
        if name != "total":
            table.rows.append([f"FLOPs: {name}", f"{value / 1e9:.3f} GFLOP ({100 * value / flops['total']:.1f} %)"])
    table.rows += [["FLOPs: total (analytic, 2 per multiply-add)", f"{flops['total'] / 1e9:.3f} GFLOP"],
                   ["step time (median)", f"{fmt_s(m.median)} (n={m.n})"],
                   ["achieved", f"{achieved / 1e9:.1f} GFLOP/s"],
                   ["matmul peak (float32)", f"{peak / 1e9:.1f} GFLOP/s"],
                   ["share of peak", f"{100 * fraction:.1f} %"]]
    split = matmul_time_split(step)
    if split is not None:
        inside, total = split
        table.rows.append(["profiled: time in matrix products", f"{100 * inside / total:.1f} % of {fmt_s(total)}, "
                           f"running at {100 * flops['total'] / inside / peak:.0f} % of peak"])
        table.rows.append(["profiled: everything else", f"{fmt_s(total - inside)} (norms, GELU, modulation, "
                           f"residuals, bias copies: memory-bound)"])
        figures["efficiency_matmul_time_share"] = inside / total
    if plan.wide_check:
        wide_batch = plan.wide_check["batch"]
        overrides = {k: v for k, v in plan.wide_check.items() if k != "batch"}
        wide_cfg, wide_net, wide_inputs = _efficiency_step(plan, wide_batch, **overrides)
        wm = measure(lambda: wide_net(*wide_inputs), plan.timing)
        wide = diffusion_step_flops(wide_cfg, wide_batch, plan.text_length)["total"] / wm.median / peak
        table.rows.append([f"same step at width {wide_cfg.dim} ({wide_cfg.num_layers} block, text "
                           f"{wide_cfg.text_dim}, batch {wide_batch})", f"{100 * wide:.1f} % of peak "
                           f"({fmt_s(wm.median)}, n={wm.n}; not the headline figure)"])
        figures["matmul_peak_fraction_wide"] = wide
    ok = fraction >= 0.7
    table.footer.append(f"target share of peak >= 70 %: {'met' if ok else 'NOT met'} ({100 * fraction:.1f} %)")
    figures.update(matmul_peak_fraction=fraction, matmul_peak_gflops=peak / 1e9,
                   efficiency_step_s=m.median, efficiency_step_flops=flops["total"],
                   efficiency_achieved_gflops=achieved / 1e9)
    return table


# --- 5. training ------------------------------------------------------------------------------------------------
def _train_spec(plan: Plan, kind: str) -> dict[str, Any]:
    model = plan.tokenizer if kind == "tokenizer" else plan.generator
    return {"kind": kind, "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model.items()},
            "batch": plan.train_batches[kind], "steps": plan.train_steps, "threads": torch.get_num_threads(),
            "text_length": plan.text_length, "bf16": plan.train_bf16, "checkpointing": plan.train_checkpointing}


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One trainer's optimiser steps (loss, backward, clip 1.0, AdamW, EMA), as binlat.train.engine does them."""
    import torch.nn.functional as F
    from ..generators import ARTransformer, DiffusionTransformer, GeneratorConfig
    from ..processes import ARDecoding, BernoulliDiffusion
    from ..tokenizer import BinaryTokenizer, TokenizerConfig, bit_regularizer
    from ..train.schedule import EMA
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    kind, batch = spec["kind"], int(spec["batch"])
    gen = torch.Generator().manual_seed(0)
    if kind == "tokenizer":
        cfg = TokenizerConfig(**spec["model"])
        model = BinaryTokenizer(cfg)
        size = cfg.image_size
        images = torch.rand(batch, cfg.in_channels, size, size, generator=gen) * 2 - 1
        noise = torch.rand(batch, cfg.num_tokens, cfg.num_bits, generator=gen)

        def loss_fn() -> torch.Tensor:
            out = model(images, temperature=1.0, noise=noise)
            recon = out.reconstruction.float()
            return (F.smooth_l1_loss(recon, images) + F.mse_loss(recon, images)
                    + 0.01 * bit_regularizer(out.probs))
    else:
        cfg = GeneratorConfig(**spec["model"])
        model = (DiffusionTransformer if kind == "diffusion" else ARTransformer)(cfg)
        bits = (torch.rand(batch, cfg.num_tokens, cfg.num_bits, generator=gen) < 0.5).float()
        text = text_features(batch, cfg.num_layers, cfg.text_dim, int(spec["text_length"]))
        if kind == "diffusion":
            process = BernoulliDiffusion()
            t = torch.rand(batch, generator=gen)
            noise = torch.rand(batch, cfg.num_tokens, cfg.num_bits, generator=gen)
            loss_fn = lambda: process.loss(model, bits, text, t=t, noise=noise)[0]  # noqa: E731
        else:
            loss_fn = lambda: ARDecoding().loss(model, bits, text)[0]  # noqa: E731
    model.train()
    if spec.get("checkpointing"):
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(model, 0.999)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if spec.get("bf16") else contextlib.nullcontext

    def step(i: int) -> None:
        with autocast():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, i)

    before = _memory_mib("VmRSS")   # model, data, EMA copy built; the optimiser state comes with the first step
    peak_source = "VmHWM" if before is not None and _reset_peak() else "ru_maxrss"
    if peak_source == "ru_maxrss":
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step(0)  # warm-up
    times = []
    for i in range(1, int(spec["steps"]) + 1):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    peak = _memory_mib("VmHWM") if peak_source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times": times, "peak_rss_mib": peak, "before_rss_mib": before, "peak_source": peak_source,
            "params": sum(p.numel() for p in params)}


def _memory_mib(name: str) -> float | None:
    """A /proc/self/status memory line (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's resident-memory high-water mark (VmHWM) to the current RSS. ru_maxrss cannot serve:
    Linux carries it across exec, so a worker started by a big parent inherits the parent's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _param_count(kind: str, model: dict[str, Any]) -> int:
    from ..generators import ARTransformer, DiffusionTransformer, GeneratorConfig
    from ..tokenizer import BinaryTokenizer, TokenizerConfig
    with torch.device("meta"):
        if kind == "tokenizer":
            net = BinaryTokenizer(TokenizerConfig(**model))
        else:
            net = (DiffusionTransformer if kind == "diffusion" else ARTransformer)(GeneratorConfig(**model))
    return sum(p.numel() for p in net.parameters())


def _memory_available_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _run_worker(spec: dict[str, Any]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    return subprocess.Popen([sys.executable, "-m", "binlat.eval.bench", "--train-worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(proc: subprocess.Popen) -> dict[str, Any]:
    """The worker's result, or {"error": why} (a killed or crashed worker costs its row, not the table)."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no message (killed? out of memory?)"])[-1]
        return {"error": f"worker failed (exit {proc.returncode}): {last}"}
    return json.loads(out.strip().splitlines()[-1])


def bench_training(plan: Plan, figures: dict[str, float]) -> Table:
    kinds = ("tokenizer", "diffusion", "ar")
    table = Table("[5/7] Training: one optimiser step of each trainer (fresh subprocess each, for a clean peak)",
                  ["trainer", "params", "batch", "step", "n", "images/s", "peak RSS", "RSS growth in steps"])
    table.notes.append("step = loss + backward + grad clip 1.0 + AdamW + EMA update (as binlat.train.engine), "
                       "after 1 warm-up step; random images (tokenizer: smooth-L1 + MSE + bit regulariser, no "
                       "perceptual/GAN) or random bits + random text features (generators, i.e. precomputed data)")
    from ..hardware import bf16_native
    if plan.train_bf16 and not bf16_native("cpu"):
        plan = replace(plan, train_bf16=False)
        table.notes.append("the preset asks for bf16 autocast, which this CPU would emulate (no avx512_bf16/AMX): "
                           "measured in float32, as binlat train would refuse bf16 here")
    table.notes.append(f"autocast bf16: {'on' if plan.train_bf16 else 'off'}, gradient checkpointing: "
                       f"{'on' if plan.train_checkpointing else 'off'} (as the preset's configs); peak RSS = the "
                       f"worker's resident high-water mark over its steps (VmHWM, reset once model, EMA copy and "
                       f"data were built); growth = peak minus the resident size at that point (activations, "
                       f"gradients, optimiser state)")
    specs = {k: _train_spec(plan, k) for k in kinds}
    # Weights, gradients, AdamW moments and the EMA copy alone need 20 bytes per parameter: skip what cannot fit.
    available = _memory_available_mib()
    skipped = {}
    for kind, spec in specs.items():
        need = 20 * _param_count(kind, spec["model"]) / 2**20
        if available is not None and need > available:
            skipped[kind] = (f"skipped: weights + gradients + AdamW + EMA alone need {need / 1024:.1f} GiB, "
                             f"{available / 1024:.1f} GiB available")
    run = {k: s for k, s in specs.items() if k not in skipped}
    if plan.mode == "tiny":  # timings mean nothing here: overlap the workers' start-up
        procs = {k: _run_worker(s) for k, s in run.items()}
        results = {k: _collect(p) for k, p in procs.items()}
    else:
        results = {k: _collect(_run_worker(s)) for k, s in run.items()}
    for kind, r in results.items():
        if "error" in r:
            skipped[kind] = r["error"]
    if len(skipped) == len(kinds):
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    for kind in kinds:
        if kind in skipped:
            params = _param_count(kind, specs[kind]["model"])
            table.rows.append([kind, f"{params / 1e6:.1f} M", specs[kind]["batch"], "-", 0, "-", "-", "-"])
            table.footer.append(f"{kind}: {skipped[kind]}")
            continue
        r, batch = results[kind], specs[kind]["batch"]
        med = statistics.median(r["times"])
        if r["peak_source"] != "VmHWM":
            table.footer.append(f"{kind}: no /proc/self/clear_refs, so peak is ru_maxrss (may include start-up)")
        params = f"{r['params'] / 1e6:.1f} M" if r["params"] >= 1e5 else f"{r['params'] / 1e3:.1f} K"
        table.rows.append([kind, params, batch, fmt_s(med), len(r["times"]),
                           f"{batch / med:.1f}", f"{r['peak_rss_mib']:.0f} MiB",
                           f"{r['peak_rss_mib'] - r['before_rss_mib']:.0f} MiB"])
        figures[f"train_{kind}_images_per_s"] = batch / med
        figures[f"train_{kind}_step_s"] = med
        figures[f"train_{kind}_peak_rss_mib"] = r["peak_rss_mib"]
        figures[f"train_{kind}_rss_growth_mib"] = r["peak_rss_mib"] - r["before_rss_mib"]
    return table


# --- 6. tokenizer -----------------------------------------------------------------------------------------------
def bench_codec(plan: Plan, figures: dict[str, float]) -> Table:
    from ..tokenizer import BinaryTokenizer, TokenizerConfig
    cfg = TokenizerConfig(**plan.tokenizer)
    tok = _seeded(lambda: BinaryTokenizer(cfg))
    batch, size = plan.codec_batch, cfg.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, cfg.in_channels, size, size, generator=gen) * 2 - 1
    bits = tok.encode(images)
    enc = measure(lambda: tok.encode(images), plan.timing)
    dec = measure(lambda: tok.decode(bits, size, size), plan.timing)
    table = Table("[6/7] Tokenizer throughput", ["direction", "batch", "time", "n", "images/s"])
    table.notes.append(f"BinaryTokenizer ({plan.preset.name if plan.mode != 'tiny' else 'tiny'}: patch "
                       f"{cfg.patch_size}, encoder {cfg.encoder_layers}L x {cfg.encoder_dim}, decoder "
                       f"{cfg.decoder_layers}L x {cfg.decoder_dim}, {cfg.num_tokens} x {cfg.num_bits} bits) at "
                       f"{size} px, float32")
    for name, m in (("encode", enc), ("decode", dec)):
        table.rows.append([name, batch, fmt_s(m.median), m.n, f"{batch / m.median:.1f}"])
        figures[f"tokenizer_{name}_images_per_s"] = batch / m.median
    return table


# --- 7. bfloat16 ------------------------------------------------------------------------------------------------
BF16_KEYS = ("bf16_step_speedup", "bf16_step_sign_agreement", "bf16_speedup", "bf16_bit_agreement",
             "bf16_generation_s", "fp32_generation_s")


def bench_bf16(plan: Plan, figures: dict[str, float]) -> Table:
    from ..hardware import bf16_native, cpu_info
    if not bf16_native("cpu"):
        # An emulated bf16 time measures PyTorch's fallback, not a speed anyone would choose: say so, report null.
        info = cpu_info()
        table = Table("[7/7] bfloat16 vs float32 inference: SKIPPED", ["why"])
        table.rows.append([f"this CPU ({info.model}; flags: {', '.join(info.flags) or 'none of note'}) has no native "
                           f"bf16 (avx512_bf16 or AMX): PyTorch emulates it, so bf16 rows would not be a speed "
                           f"(the header's bf16 matmul peak shows the emulation); BINLAT_ASSUME_BF16=1 runs them"])
        figures.update({k: None for k in BF16_KEYS})
        return table
    from ..processes import BernoulliDiffusion
    from ..processes.common import make_generators
    from ..tokenizer import BinaryTokenizer, TokenizerConfig
    table = Table("[7/7] bfloat16 vs float32 inference", ["what", "float32", "n", "bfloat16", "n", "speedup",
                                                          "agreement"])
    # The batched step of table 4 (paper token count, preset width).
    batch = plan.efficiency_batch
    step_cfg, net32, inputs = _efficiency_step(plan, batch)
    net16 = copy.deepcopy(net32).to(torch.bfloat16)
    s32 = measure(lambda: net32(*inputs).float(), plan.timing)
    s16 = measure(lambda: net16(*inputs).float(), plan.timing)
    sign = float(((s32.result > 0) == (s16.result > 0)).float().mean())
    table.rows.append([f"diffusion step (batch {batch} x {step_cfg.num_tokens} tokens)", fmt_s(s32.median), s32.n,
                       fmt_s(s16.median), s16.n, fmt_x(s32.median / s16.median),
                       f"{100 * sign:.2f} % logit signs"])
    # A full generation at the preset's own sizes: text features -> 20 guided steps -> decode to pixels.
    gen_cfg = _gen_config(plan)
    tok_cfg = TokenizerConfig(**plan.tokenizer)
    g32, t32 = diffusion_network(gen_cfg), _seeded(lambda: BinaryTokenizer(tok_cfg), 1)
    g16, t16 = copy.deepcopy(g32).to(torch.bfloat16), copy.deepcopy(t32).to(torch.bfloat16)
    n = plan.bf16_batch
    cond, uncond = prompt_pair(plan, n)
    process = BernoulliDiffusion(prediction=gen_cfg.prediction)

    def generate(g: torch.nn.Module, tok: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        bits = process.sample(g, cond, uncond, make_generators(range(n)), num_steps=plan.steps,
                              guidance_scale=plan.guidance)
        return bits, tok.decode(bits, tok_cfg.image_size, tok_cfg.image_size)

    f32 = measure(lambda: generate(g32, t32), plan.timing)
    f16 = measure(lambda: generate(g16, t16), plan.timing)
    agree = float((f32.result[0] == f16.result[0]).float().mean())
    table.rows.append([f"full generation ({n} images: {plan.steps} steps + decode at {tok_cfg.image_size} px)",
                       fmt_s(f32.median), f32.n, fmt_s(f16.median), f16.n, fmt_x(f32.median / f16.median),
                       f"{100 * agree:.2f} % bits"])
    table.notes.append(f"generator {plan.width}; the step is table 4's; the generation uses the preset's own "
                       f"{gen_cfg.num_tokens} tokens x {gen_cfg.num_bits} bits and tokenizer, seeds 0..{n - 1}, "
                       f"guidance {plan.guidance:g}, temperature 1; agreement = share of equal bits, same seeds")
    peak16, m16 = matmul_peak(plan.peak_size, torch.bfloat16, plan.timing)
    share16 = diffusion_step_flops(step_cfg, batch, plan.text_length)["total"] / s16.median / peak16
    table.footer.append(f"bfloat16 matmul peak ({plan.peak_size}^2, n={m16.n}): {peak16 / 1e9:.1f} GFLOP/s; "
                        f"the bfloat16 step reaches {100 * share16:.1f} % of it")
    figures.update(bf16_step_speedup=s32.median / s16.median, bf16_step_sign_agreement=sign,
                   bf16_speedup=f32.median / f16.median, bf16_bit_agreement=agree,
                   bf16_generation_s=f16.median, fp32_generation_s=f32.median,
                   matmul_peak_bf16_gflops=peak16 / 1e9)
    return table


# --- driver -----------------------------------------------------------------------------------------------------
COMPARISONS: tuple[tuple[str, Callable[[Plan, dict[str, float]], Table]], ...] = (
    ("ar", bench_ar), ("tokens", bench_tokens), ("e2e", bench_e2e), ("efficiency", bench_efficiency),
    ("training", bench_training), ("tokenizer", bench_codec), ("bf16", bench_bf16))


def run_bench(preset: str = "shapes-64", quick: bool = False, tiny: bool = False, json_path: str | None = None,
              out: Callable[[str], None] = print, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparisons, print one table each, return (and optionally write as JSON) every figure.

    A comparison that fails prints its error in place of its table; the others still run. `failed` in the result
    lists them."""
    plan = make_plan(preset, quick=quick, tiny=tiny)
    if json_path and not Path(json_path).resolve().parent.is_dir():
        raise ValueError(f"--json {json_path}: folder {Path(json_path).resolve().parent} does not exist")
    started = time.perf_counter()
    header = [f"binlat bench: preset {preset}, mode {plan.mode}",
              f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}, "
              f"torch.get_num_threads() = {torch.get_num_threads()}; float32 unless noted; inference_mode",
              "each time is the median of n timed runs after warm-up; each ratio is a ratio of medians"]
    if hasattr(os, "getloadavg"):
        header.append(f"load average at start: {os.getloadavg()[0]:.2f} (other work on this machine slows what "
                      f"is measured; each table says how busy the other processes kept the CPUs)")
    hardware = hardware_report(plan)
    header.append(f"hardware: {hardware['model']}; flags {', '.join(hardware['flags']) or 'none of note'}; "
                  f"{hardware['threads']} threads; matmul peak float32 {hardware['matmul_peak_fp32_gflops']:.1f} "
                  f"GFLOP/s, bfloat16 {hardware['matmul_peak_bf16_gflops']:.1f} GFLOP/s "
                  f"({'native' if hardware['bf16_native'] else 'emulated: bf16 rows are skipped'})")
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
            table = Table(f"[{[n for n, _ in COMPARISONS].index(name) + 1}/7] {name}: FAILED", ["error"],
                          [[f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"]])
        other = load.other_cores()
        busy = "" if other is None else f"; meanwhile other processes kept {other:.2f} of {os.cpu_count()} CPUs busy"
        table.footer.append(f"({time.perf_counter() - t0:.1f} s{busy})")
        if other is not None:
            figures[f"other_cpu_load_{name}"] = other
        out("")
        out(table.render())
        tables.append(table.to_dict())
    wall = time.perf_counter() - started
    out(f"\ntotal wall time: {wall:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    result: dict[str, Any] = dict(figures)
    result["hardware"] = hardware
    result["meta"] = {"preset": preset, "mode": plan.mode, "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "logical_cpus": os.cpu_count(), "torch": torch.__version__, "notes": plan.notes,
                      "wall_s": wall, "failed": failed}
    result["tables"] = tables
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":  # the training worker: python -m binlat.eval.bench --train-worker SPEC_JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--train-worker":
        print(json.dumps(train_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: binlat bench [...] (this module's own entry point only runs training workers)")
