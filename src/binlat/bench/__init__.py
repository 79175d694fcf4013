"""`binlat bench`: speed, efficiency and memory of binlat against the things it claims to beat.

Eight comparisons, all in one process (training in fresh subprocesses, for a clean memory peak), on randomly
initialised networks and random text features of the right shape (a fixed 32-token text with a padding mask), so
no trained weights and no language model are needed:

1. AR decoding, KV-cached (the default static-buffer step; the compiled one in a full run) vs full recomputation
   (the release's sampler), with a check that the bits agree and, where batch 1 misses, its operator count.
2. One diffusion-transformer step over 128 binary tokens vs the same network over 1,024 and 4,096 tokens.
3. End to end (20 guided steps + decode with the release's own tokenizer) vs a latent-diffusion pipeline of
   `diffusers` parts of equal transformer width and depth (PixArt-style transformer over an 8x-downsampled latent,
   patch 2, + an SD-style AutoencoderKL).
4. Achieved FLOP/s of a batched diffusion step (FLOPs counted analytically) as a share of measured matmul peak
   (and, in a full run, of the torch.compile'd step).
5. Images/s, share of peak and peak resident memory of one training step of each stage of the shipped recipe.
6. Tokenizer encode and decode throughput.
7. bfloat16 vs float32: the same diffusion step and a full generation, with bit agreement.
8. Generation with the shipped recipe's sizes at batch 64, images/s beside the bound of peak / FLOPs per image.

Every time is a median over repeated runs after warm-up; every ratio is a ratio of medians. Each table says how
many runs stand behind each figure and what, if anything, was reduced or composed to fit the time budget, and how
busy other processes kept the CPUs meanwhile.

Headline JSON keys (all plain numbers; `--json` also writes every median behind them, and the tables):
`ar_kv_speedup` (recompute / cached time at 128 tokens, batch 1; `ar_kv_speedup_large_batch` at batch 8),
`tokens_128_vs_4096_speedup` (4,096-token step time / 128-token step time), `e2e_512_speedup` and
`e2e_1024_speedup` (latent-diffusion s/image / binlat s/image), `matmul_peak_fraction` (achieved / peak FLOP/s),
`bf16_speedup` (float32 / bfloat16 time of a full generation; `bf16_step_speedup` for the batched step; null where
bf16 is emulated), `sample_bound_fraction_diffusion` / `sample_bound_fraction_ar` (images/s over the FLOP bound).

Modules: `plan` (presets, read from the packaged training configs, and modes), `harness` (timing, machine probes,
table cells), `flops` (FLOP formulas), `inputs` (random networks and text), `baseline` (the diffusers
latent-diffusion pipeline), `generation` (tables 1-3), `efficiency` (tables 4, 6, 7), `training` (table 5 and its
worker), `throughput` (table 8, training FLOPs), `run` (the driver). Tables print through
binlat.eval.report.render_table.
"""

from __future__ import annotations

from .efficiency import BF16_KEYS
from .flops import counted_flops, diffusion_step_flops
from .harness import Measured, Table, cpu_model, measure
from .plan import PRESET_NAMES, Plan, Preset, Timing, load_preset, make_plan, preset_root
from .run import COMPARISONS, run_bench
from .training import train_worker

REQUIRED_KEYS = (
    "ar_kv_speedup",
    "tokens_128_vs_4096_speedup",
    "e2e_512_speedup",
    "e2e_1024_speedup",
    "matmul_peak_fraction",
    "bf16_speedup",
    "sample_bound_fraction_diffusion",
    "sample_bound_fraction_ar",
)

__all__ = [
    "BF16_KEYS",
    "COMPARISONS",
    "PRESET_NAMES",
    "REQUIRED_KEYS",
    "Measured",
    "Plan",
    "Preset",
    "Table",
    "Timing",
    "counted_flops",
    "cpu_model",
    "diffusion_step_flops",
    "load_preset",
    "make_plan",
    "measure",
    "preset_root",
    "run_bench",
    "train_worker",
]
