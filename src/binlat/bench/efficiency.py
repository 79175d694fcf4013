"""Tables 4, 6 and 7: share of the matmul peak, tokenizer throughput, and bfloat16 against float32."""

from __future__ import annotations

import copy
import time

import torch

from ..modeling import Network
from .flops import diffusion_step_flops
from .harness import Measured, Table, fmt_s, fmt_x, matmul_peak, matmul_time_split, measure
from .inputs import diffusion_network, efficiency_step, gen_config, prompt_pair, seeded
from .plan import Plan


# --- 4. hardware efficiency -------------------------------------------------------------------------------------
def bench_efficiency(plan: Plan, figures: dict[str, float]) -> Table:
    batch = plan.efficiency_batch
    config, net, inputs = efficiency_step(plan, batch)
    step = lambda: net(*inputs)  # noqa: E731
    # The peak is sampled right before and right after the step and pooled, so both see the same machine.
    _, before = matmul_peak(plan.peak_size, torch.float32, plan.timing)
    m = measure(step, plan.timing)
    _, after = matmul_peak(plan.peak_size, torch.float32, plan.timing)
    peak_m = Measured(before.times + after.times)
    peak = 2 * plan.peak_size**3 / peak_m.median
    flops = diffusion_step_flops(config, batch, plan.text_length)
    achieved = flops["total"] / m.median
    fraction = achieved / peak
    table = Table(
        "[4/8] Hardware efficiency: achieved FLOP/s of a batched diffusion step vs measured matmul peak",
        ["item", "value"],
    )
    table.notes.append(
        f"DiffusionTransformer {plan.width}, batch {batch} x {config.num_tokens} tokens, "
        f"{plan.text_length} text positions, float32; peak = median of a {plan.peak_size}x"
        f"{plan.peak_size} float32 torch.matmul ({peak_m.n} runs, half before and half after the "
        f"step) in this process"
    )
    for name, value in flops.items():
        if name != "total":
            table.rows.append([f"FLOPs: {name}", f"{value / 1e9:.3f} GFLOP ({100 * value / flops['total']:.1f} %)"])
    table.rows += [
        ["FLOPs: total (analytic, 2 per multiply-add)", f"{flops['total'] / 1e9:.3f} GFLOP"],
        ["step time (median)", f"{fmt_s(m.median)} (n={m.n})"],
        ["achieved", f"{achieved / 1e9:.1f} GFLOP/s"],
        ["matmul peak (float32)", f"{peak / 1e9:.1f} GFLOP/s"],
        ["share of peak", f"{100 * fraction:.1f} %"],
    ]
    split = matmul_time_split(step)
    if split is not None:
        inside, total = split
        table.rows.append(
            [
                "profiled: time in matrix products",
                f"{100 * inside / total:.1f} % of {fmt_s(total)}, "
                f"running at {100 * flops['total'] / inside / peak:.0f} % of peak",
            ]
        )
        table.rows.append(
            [
                "profiled: everything else",
                f"{fmt_s(total - inside)} (norms, GELU, modulation, residuals, bias copies: memory-bound)",
            ]
        )
        figures["efficiency_matmul_time_share"] = inside / total
    if plan.wide_check:
        wide_batch = plan.wide_check["batch"]
        overrides = {k: v for k, v in plan.wide_check.items() if k != "batch"}
        wide_cfg, wide_net, wide_inputs = efficiency_step(plan, wide_batch, **overrides)
        wm = measure(lambda: wide_net(*wide_inputs), plan.timing)
        wide = diffusion_step_flops(wide_cfg, wide_batch, plan.text_length)["total"] / wm.median / peak
        table.rows.append(
            [
                f"same step at width {wide_cfg.dim} ({wide_cfg.num_layers} block, text "
                f"{wide_cfg.text_dim}, batch {wide_batch})",
                f"{100 * wide:.1f} % of peak ({fmt_s(wm.median)}, n={wm.n}; not the headline figure)",
            ]
        )
        figures["matmul_peak_fraction_wide"] = wide
    if plan.efficiency_compiled:
        compiled = torch.compile(net, dynamic=False)
        t0 = time.perf_counter()
        compiled(*inputs)  # traces and compiles
        figures["efficiency_compile_s"] = time.perf_counter() - t0
        cm = measure(lambda: compiled(*inputs), plan.timing)
        c_fraction = flops["total"] / cm.median / peak
        diff = float((cm.result - m.result).abs().max())
        same = "the same logits bit for bit" if diff == 0 else f"logits differ from eager by up to {diff:.2e}"
        table.rows.append(
            [
                "torch.compile'd step (opt in)",
                f"{100 * c_fraction:.1f} % of peak ({fmt_s(cm.median)}, n={cm.n}; {same})",
            ]
        )
        figures.update(matmul_peak_fraction_compiled=c_fraction, efficiency_compiled_max_abs_diff=diff)
        if diff:
            table.footer.append(
                "the compiled step rounds differently, so eager stays the default for batched "
                "generation (Pipeline.compile() / binlat generate --compile opt in)"
            )
    else:
        table.footer.append("compiled step not timed in this mode (its first call compiles for tens of seconds)")
    ok = fraction >= 0.7
    table.footer.append(f"target share of peak >= 70 %: {'met' if ok else 'NOT met'} ({100 * fraction:.1f} %)")
    if not ok and split is not None:
        inside, total = split
        table.footer.append(
            f"why: at width {config.dim} the matrix products take {100 * inside / total:.0f} % of "
            f"the profiled step and run at {100 * flops['total'] / inside / peak:.0f} % of peak; the "
            f"other {fmt_s(total - inside)} is elementwise work (norms, modulation, GELU, residuals) "
            f"that moves memory and does no matmul FLOPs"
        )
    figures.update(
        matmul_peak_fraction=fraction,
        matmul_peak_gflops=peak / 1e9,
        efficiency_step_s=m.median,
        efficiency_step_flops=flops["total"],
        efficiency_achieved_gflops=achieved / 1e9,
    )
    return table


# --- 6. tokenizer -----------------------------------------------------------------------------------------------
def bench_codec(plan: Plan, figures: dict[str, float]) -> Table:
    from ..tokenizer import BinaryTokenizer, TokenizerConfig

    cfg = TokenizerConfig(**plan.tokenizer)
    tok = seeded(lambda: BinaryTokenizer(cfg))
    batch, size = plan.codec_batch, cfg.image_size
    rng = torch.Generator().manual_seed(0)
    images = torch.rand(batch, cfg.in_channels, size, size, generator=rng) * 2 - 1
    bits = tok.encode(images)
    enc = measure(lambda: tok.encode(images), plan.timing)
    dec = measure(lambda: tok.decode(bits, size, size), plan.timing)
    table = Table("[6/8] Tokenizer throughput", ["direction", "batch", "time", "n", "images/s"])
    table.notes.append(
        f"BinaryTokenizer ({plan.preset.name if plan.mode != 'tiny' else 'tiny'}: patch "
        f"{cfg.patch_size}, encoder {cfg.encoder_layers}L x {cfg.encoder_dim}, decoder "
        f"{cfg.decoder_layers}L x {cfg.decoder_dim}, {cfg.num_tokens} x {cfg.num_bits} bits) at "
        f"{size} px, float32"
    )
    for name, m in (("encode", enc), ("decode", dec)):
        table.rows.append([name, batch, fmt_s(m.median), m.n, f"{batch / m.median:.1f}"])
        figures[f"tokenizer_{name}_images_per_s"] = batch / m.median
    return table


# --- 7. bfloat16 ------------------------------------------------------------------------------------------------
BF16_KEYS = (
    "bf16_step_speedup",
    "bf16_step_sign_agreement",
    "bf16_speedup",
    "bf16_bit_agreement",
    "bf16_generation_s",
    "fp32_generation_s",
)


def bench_bf16(plan: Plan, figures: dict[str, float]) -> Table:
    from ..hardware import bf16_native, cpu_info

    if not bf16_native("cpu"):
        # An emulated bf16 time measures PyTorch's fallback, not a speed anyone would choose: say so, report null.
        info = cpu_info()
        table = Table("[7/8] bfloat16 vs float32 inference: SKIPPED", ["why"])
        table.rows.append(
            [
                f"this CPU ({info.model}; flags: {', '.join(info.flags) or 'none of note'}) has no native "
                f"bf16 (avx512_bf16 or AMX): PyTorch emulates it, so bf16 rows would not be a speed "
                f"(the header's bf16 matmul peak shows the emulation); BINLAT_ASSUME_BF16=1 runs them"
            ]
        )
        figures.update({k: None for k in BF16_KEYS})  # type: ignore[misc]  # null in the report: not measured
        return table
    from ..processes import BernoulliDiffusion
    from ..processes.common import make_generators
    from ..tokenizer import BinaryTokenizer, TokenizerConfig

    table = Table(
        "[7/8] bfloat16 vs float32 inference", ["what", "float32", "n", "bfloat16", "n", "speedup", "agreement"]
    )
    # The batched step of table 4 (paper token count, preset width).
    batch = plan.efficiency_batch
    step_cfg, net32, inputs = efficiency_step(plan, batch)
    net16 = copy.deepcopy(net32).to(torch.bfloat16)
    s32 = measure(lambda: net32(*inputs).float(), plan.timing)
    s16 = measure(lambda: net16(*inputs).float(), plan.timing)
    sign = float(((s32.result > 0) == (s16.result > 0)).float().mean())
    table.rows.append(
        [
            f"diffusion step (batch {batch} x {step_cfg.num_tokens} tokens)",
            fmt_s(s32.median),
            s32.n,
            fmt_s(s16.median),
            s16.n,
            fmt_x(s32.median / s16.median),
            f"{100 * sign:.2f} % logit signs",
        ]
    )
    # A full generation at the preset's own sizes: text features -> 20 guided steps -> decode to pixels.
    gen_cfg = gen_config(plan, "diffusion")
    tok_cfg = TokenizerConfig(**plan.tokenizer)
    g32, t32 = diffusion_network(gen_cfg), seeded(lambda: BinaryTokenizer(tok_cfg), 1)
    g16, t16 = copy.deepcopy(g32).to(torch.bfloat16), copy.deepcopy(t32).to(torch.bfloat16)
    n = plan.bf16_batch
    cond, uncond = prompt_pair(plan, n)
    process = BernoulliDiffusion(prediction=gen_cfg.prediction)

    def generate(g: Network, tok: Network) -> tuple[torch.Tensor, torch.Tensor]:
        bits = process.sample(
            g, cond, uncond, make_generators(range(n)), num_steps=plan.steps, guidance_scale=plan.guidance
        )
        return bits, tok.decode(bits, tok_cfg.image_size, tok_cfg.image_size)

    f32 = measure(lambda: generate(g32, t32), plan.timing)
    f16 = measure(lambda: generate(g16, t16), plan.timing)
    agree = float((f32.result[0] == f16.result[0]).float().mean())
    table.rows.append(
        [
            f"full generation ({n} images: {plan.steps} steps + decode at {tok_cfg.image_size} px)",
            fmt_s(f32.median),
            f32.n,
            fmt_s(f16.median),
            f16.n,
            fmt_x(f32.median / f16.median),
            f"{100 * agree:.2f} % bits",
        ]
    )
    table.notes.append(
        f"generator {plan.width}; the step is table 4's; the generation uses the preset's own "
        f"{gen_cfg.num_tokens} tokens x {gen_cfg.num_bits} bits and tokenizer, seeds 0..{n - 1}, "
        f"guidance {plan.guidance:g}, temperature 1; agreement = share of equal bits, same seeds"
    )
    peak16, m16 = matmul_peak(plan.peak_size, torch.bfloat16, plan.timing)
    share16 = diffusion_step_flops(step_cfg, batch, plan.text_length)["total"] / s16.median / peak16
    table.footer.append(
        f"bfloat16 matmul peak ({plan.peak_size}^2, n={m16.n}): {peak16 / 1e9:.1f} GFLOP/s; "
        f"the bfloat16 step reaches {100 * share16:.1f} % of it"
    )
    figures.update(
        bf16_step_speedup=s32.median / s16.median,
        bf16_step_sign_agreement=sign,
        bf16_speedup=f32.median / f16.median,
        bf16_bit_agreement=agree,
        bf16_generation_s=f16.median,
        fp32_generation_s=f32.median,
        matmul_peak_bf16_gflops=peak16 / 1e9,
    )
    return table
