"""Tables 1-3: AR decoding with and without its KV cache, token count, and end to end against latent diffusion."""

from __future__ import annotations

import time

import torch

from .baseline import LatentDiffusionBaseline, baseline_image, pixart, require_diffusers, vae
from .flops import counted_flops, diffusion_step_flops
from .harness import Table, fmt_s, fmt_x, measure, operator_calls, target
from .inputs import diffusion_network, gen_config, prompt_pair, seeded
from .plan import SD_VAE, Plan


# --- 1. AR decoding ---------------------------------------------------------------------------------------------
def bench_ar(plan: Plan, figures: dict[str, float]) -> Table:
    from ..generators import ARTransformer
    from ..processes import ARDecoding
    from ..processes.common import make_generators

    table = Table(
        "[1/8] AR decoding: KV cache vs full recomputation (use_cache=False, the release's algorithm)",
        ["tokens", "batch", "decode", "cached s/img", "per step", "n", "recompute s/img", "n", "speedup", "same bits"],
    )
    table.notes.append(
        f"ARTransformer {plan.width}, {plan.generator['num_bits']} bits/token, guidance "
        f"{plan.guidance:g} (cond+uncond rows), temperature 1, seeds 0..batch-1; time per image = "
        f"median batch time / batch"
    )
    table.notes.append(
        "decode static = the default: one ARTransformer.decode_step per token over preallocated "
        "buffers, the same bits as the growing cache; compiled = ARDecoding(decode='compiled'), opt "
        "in (torch.compile of the fixed-shape step; equal to float tolerance, not bit for bit)"
    )
    table.notes.append("warm-up: cached = one full run; recompute = its last 2 steps (a prefix fixes the others)")
    for tokens in plan.ar_tokens:
        net = seeded(lambda: ARTransformer(gen_config(plan, "ar", num_tokens=tokens)))
        for batch in plan.ar_batches:
            cond, uncond = prompt_pair(plan, batch)

            def run(cached: bool, prefix: torch.Tensor | None = None, decode: str = "static") -> torch.Tensor:
                return ARDecoding(use_cache=cached, decode=decode).sample(
                    net, cond, uncond, make_generators(range(batch)), guidance_scale=plan.guidance, prefix=prefix
                )

            prefix = torch.zeros(batch, max(tokens - 2, 0), plan.generator["num_bits"])
            fast = measure(lambda: run(True), plan.timing)
            slow = measure(lambda: run(False), plan.timing, warmup=lambda: run(False, prefix))
            key = f"ar_{tokens}tok_b{batch}"
            _ar_row(table, figures, key, "static", tokens, batch, fast, slow)
            if plan.ar_compiled and batch == plan.ar_batches[0]:
                t0 = time.perf_counter()
                run(True, decode="compiled")  # the first call traces and compiles
                figures[f"{key}_compile_s"] = time.perf_counter() - t0
                compiled = measure(lambda: run(True, decode="compiled"), plan.timing)
                _ar_row(table, figures, f"{key}_compiled", "compiled", tokens, batch, compiled, slow)
    top = max(plan.ar_tokens)
    figures["ar_kv_speedup"] = figures[f"ar_{top}tok_b{plan.ar_batches[0]}_speedup"]
    figures["ar_kv_speedup_large_batch"] = figures[f"ar_{top}tok_b{plan.ar_batches[1]}_speedup"]
    if f"ar_{top}tok_b{plan.ar_batches[0]}_compiled_speedup" in figures:
        figures["ar_kv_speedup_compiled"] = figures[f"ar_{top}tok_b{plan.ar_batches[0]}_compiled_speedup"]
    for batch in plan.ar_batches:
        table.footer.append(
            target(figures[f"ar_{top}tok_b{batch}_speedup"], 10, f"speedup at {top} tokens, batch {batch}")
        )
    table.footer.append("per step = cached batch time / tokens: one token for the whole batch, every block")
    if figures["ar_kv_speedup"] < 10:
        step_s = figures[f"ar_{top}tok_b{plan.ar_batches[0]}_cached_s_per_image"] * plan.ar_batches[0] / top
        table.footer.append(_ar_overhead(plan, top, step_s))
    if not plan.ar_compiled:
        table.footer.append("compiled decoding not timed in this mode (its first call compiles for tens of seconds)")
    return table


def _ar_row(
    table: Table, figures: dict[str, float], key: str, decode: str, tokens: int, batch: int, fast, slow
) -> None:
    ratio = slow.median / fast.median
    differ, total = int((fast.result != slow.result).sum()), fast.result.numel()
    same = "yes" if differ == 0 else f"NO ({differ}/{total} differ)"
    table.rows.append(
        [
            tokens,
            batch,
            decode,
            fmt_s(fast.median / batch),
            fmt_s(fast.median / tokens),
            fast.n,
            fmt_s(slow.median / batch),
            slow.n,
            fmt_x(ratio),
            same,
        ]
    )
    figures[f"{key}_cached_s_per_image"] = fast.median / batch
    figures[f"{key}_recompute_s_per_image"] = slow.median / batch
    figures[f"{key}_speedup"] = ratio
    figures[f"{key}_bits_equal_fraction"] = 1 - differ / total


def _ar_overhead(plan: Plan, tokens: int, step_s: float) -> str:
    """Why batch 1 misses: one profiled decode step, its operator count and arithmetic rate (the measured cause)."""
    from ..generators import ARTransformer
    from ..processes.common import with_guidance

    net = seeded(lambda: ARTransformer(gen_config(plan, "ar", num_tokens=tokens)))
    cond, uncond = prompt_pair(plan, 1)
    text = with_guidance(cond, uncond, plan.guidance)
    row = torch.zeros(2, 1, net.config.num_bits)

    def one_step():  # the step after the start token, on a freshly filled cache
        cache = net.new_cache(2, plan.text_length)
        net(None, text.layers, text.mask, cache)
        return lambda: net.decode_step(row, cache)

    calls = operator_calls(one_step())
    flops = counted_flops(one_step())
    if calls is None:
        return "batch 1: the step could not be profiled here"
    rate = "" if not flops else f", {flops / step_s / 1e9:.2f} GFLOP/s of arithmetic"
    return (
        f"why batch 1 misses: one cached step (2 rows) runs {calls} operator calls in {fmt_s(step_s)} "
        f"({fmt_s(step_s / calls)} each{rate}): per-operator overhead, not arithmetic; larger batches "
        f"share it (see batch {plan.ar_batches[1]}), compiling fuses it (decode='compiled')"
    )


# --- 2. token count ---------------------------------------------------------------------------------------------
def bench_tokens(plan: Plan, figures: dict[str, float]) -> Table:
    from ..processes.common import with_guidance

    counts = plan.token_counts
    net = diffusion_network(gen_config(plan, "diffusion", num_tokens=max(counts)))
    config = net.config
    cond, uncond = prompt_pair(plan, 1)
    text = with_guidance(cond, uncond, plan.guidance)  # 2 rows: one guided image
    table = Table(
        "[2/8] Token count: one diffusion-transformer step, 128 binary tokens vs 1,024 / 4,096 tokens",
        ["tokens", "step", "n", "GFLOP", "slower than 128", "FLOP ratio"],
    )
    table.notes.append(
        f"one DiffusionTransformer {plan.width}, built with num_tokens={max(counts)} (pos_emb, the "
        f"only size-dependent parameter, is sliced); batch 2 (cond+uncond of one image), "
        f"{plan.text_length} text positions"
    )
    base = None
    for tokens in counts:
        rng = torch.Generator().manual_seed(tokens)
        x = (torch.rand(2, tokens, config.num_bits, generator=rng) < 0.5).float()
        t = torch.full((2,), 0.5)
        m = measure(lambda: net(x, t, text.layers, text.mask), plan.timing)
        flops = diffusion_step_flops(config, 2, plan.text_length, tokens)["total"]
        base = base or (m.median, flops)
        table.rows.append(
            [tokens, fmt_s(m.median), m.n, f"{flops / 1e9:.2f}", fmt_x(m.median / base[0]), fmt_x(flops / base[1])]
        )
        figures[f"diffusion_step_{tokens}tok_s"] = m.median
        figures[f"diffusion_step_{tokens}tok_flops"] = flops
    assert base is not None  # counts holds three sizes
    figures["tokens_128_vs_1024_speedup"] = figures[f"diffusion_step_{counts[1]}tok_s"] / base[0]
    figures["tokens_128_vs_4096_speedup"] = figures[f"diffusion_step_{counts[2]}tok_s"] / base[0]
    table.footer.append(target(figures["tokens_128_vs_4096_speedup"], 25, f"{counts[0]}-token step vs {counts[2]}"))
    return table


# --- 3. end to end ----------------------------------------------------------------------------------------------
def bench_e2e(plan: Plan, figures: dict[str, float]) -> Table:
    require_diffusers()
    from ..processes import BernoulliDiffusion
    from ..processes.common import make_generators
    from ..tokenizer import BinaryTokenizer, TokenizerConfig

    tok_cfg = TokenizerConfig(**(plan.e2e_tokenizer or plan.tokenizer))
    # The generator writes the token grid of the tokenizer that decodes it (the release's: 128 x 128 bits).
    gen_cfg = gen_config(plan, "diffusion", num_tokens=tok_cfg.num_tokens, num_bits=tok_cfg.num_bits)
    table = Table(
        "[3/8] End to end: binlat vs a latent-diffusion pipeline of diffusers parts (seconds per image)",
        ["size", "binlat s/img", "n", "latent-diff s/img", "n", "speedup", "binlat GFLOP", "LDM GFLOP", "FLOP ratio"],
    )
    v = plan.vae
    table.notes.append(
        f"binlat: BernoulliDiffusion.sample ({plan.steps} steps, guidance {plan.guidance:g}) with "
        f"DiffusionTransformer {plan.width} over {gen_cfg.num_tokens} tokens x {gen_cfg.num_bits} bits"
        f", then BinaryTokenizer.decode at the size"
    )
    table.notes.append(
        f"tokenizer: {_tokenizer_name(plan)}: patch {tok_cfg.patch_size}, decoder "
        f"{tok_cfg.decoder_layers}L x {tok_cfg.decoder_dim}, 2x2 up-sampling after block(s) "
        f"{list(tok_cfg.upsample_after) or 'none'}, rope reference size {tok_cfg.rope_reference_size}"
    )
    table.notes.append(
        f"latent diffusion: PixArtTransformer2DModel of the same layers/heads/head_dim (+ its "
        f"cross-attention), patch 2, 4 channels, over the 8x-downsampled latent; {plan.steps} DDIM "
        f"steps with guidance (batch 2); AutoencoderKL decoder, channels "
        f"{tuple(v['block_out_channels'])} x {v['layers_per_block']} layers/block "
        f"({'SD' if v == SD_VAE else 'reduced'} config)"
    )
    if plan.e2e_composed:
        table.notes.append(
            f"latent diffusion s/img at {', '.join(f'{z} px' for z in plan.e2e_composed)} COMPOSED: "
            f"{plan.steps} x median guided step (n runs) + one VAE decode (after a 64 px warm-up); "
            f"binlat images are complete runs"
        )
    if plan.e2e_scaled:
        table.notes.append(
            f"{', '.join(f'{z} px' for z in plan.e2e_scaled)} SCALED: each side's decode time = its "
            f"{plan.e2e_base or plan.e2e_sizes[0]} px decode time x its decode FLOP ratio (counted); "
            f"the generator steps are timed at the size"
        )
    if plan.small_warmup:
        table.notes.append(
            f"binlat warm-up: one full image at {8 * tok_cfg.size_multiple} px (same code path), "
            f"then timed runs at the size"
        )
    table.notes.append(
        "GFLOP: matrix products and convolutions per image (torch FlopCounterMode on the meta "
        "device); both sides random init, float32, same threads"
    )
    network = diffusion_network(gen_cfg)
    tokenizer = seeded(lambda: BinaryTokenizer(tok_cfg))
    cond, uncond = prompt_pair(plan, 1)
    process = BernoulliDiffusion(prediction=gen_cfg.prediction)
    decoder = seeded(lambda: vae(plan), 1)
    warm_size = 8 * tok_cfg.size_multiple if plan.small_warmup else None

    def sample() -> torch.Tensor:
        return process.sample(
            network, cond, uncond, make_generators([0]), num_steps=plan.steps, guidance_scale=plan.guidance
        )

    def binlat_image(size: int) -> torch.Tensor:
        return tokenizer.decode(sample(), size, size)

    sampling = measure(sample, plan.timing)
    figures["e2e_binlat_sampling_s"] = sampling.median

    base: dict[str, float] = {}  # the measured decode times that scaled sizes start from
    small = torch.zeros(1, 4, 8, 8)
    warm = (lambda: binlat_image(warm_size)) if warm_size else None
    if plan.e2e_base:
        b = plan.e2e_base
        ours_b = measure(lambda: binlat_image(b), plan.timing, warmup=warm)
        ldm_b = LatentDiffusionBaseline(plan, b, seeded(lambda: pixart(plan, b // 8), 2), decoder)
        latents_b = ldm_b.noise()
        vae_b = measure(lambda: ldm_b.decode(latents_b), plan.timing, warmup=lambda: ldm_b.decode(small), max_runs=1)
        base.update(
            size=b, ours_decode=max(ours_b.median - sampling.median, 0.0), ours_n=ours_b.n, ldm_decode=vae_b.median
        )
        figures[f"e2e_{b}_binlat_decode_s"], figures[f"e2e_{b}_ldm_decode_s"] = base["ours_decode"], vae_b.median
        table.footer.append(
            f"scaled from {b} px: binlat decode {fmt_s(base['ours_decode'])} (n={ours_b.n}), VAE "
            f"decode {fmt_s(vae_b.median)} (n={vae_b.n}), both measured"
        )
    ours_n: int | str  # a measured count, or "measured+scaled" counts
    theirs_n: int | str
    for size in plan.e2e_sizes:
        tokenizer.check_size(size, size)
        baseline = LatentDiffusionBaseline(plan, size, seeded(lambda: pixart(plan, size // 8), 2), decoder)
        latents, t = baseline.noise(), baseline.scheduler.timesteps[0]
        if size in plan.e2e_scaled:
            first = int(base["size"])  # a size, kept in the dict of times
            ours_s = sampling.median + base["ours_decode"] * (
                _decode_flops(tok_cfg, size) / _decode_flops(tok_cfg, first)
            )
            ours_n = f"{sampling.n}+{base['ours_n']}"
            step = measure(lambda: baseline.step(latents, t), plan.timing)
            theirs_s = plan.steps * step.median + base["ldm_decode"] * (
                _vae_flops(plan, size) / _vae_flops(plan, first)
            )
            theirs_n = f"{step.n}+scaled"
            figures[f"e2e_{size}_ldm_step_s"] = step.median
        else:
            ours = measure(lambda: binlat_image(size), plan.timing, warmup=warm)
            ours_s, ours_n = ours.median, ours.n
            base.setdefault("size", size)
            base.setdefault("ours_decode", max(ours.median - sampling.median, 0.0))
            base.setdefault("ours_n", ours.n)
            if size in plan.e2e_composed:
                step = measure(lambda: baseline.step(latents, t), plan.timing)
                decode = measure(
                    lambda: baseline.decode(latents), plan.timing, warmup=lambda: baseline.decode(small), max_runs=1
                )
                theirs_s, theirs_n = plan.steps * step.median + decode.median, f"{step.n}+{decode.n}"
                figures[f"e2e_{size}_ldm_step_s"] = step.median
                figures[f"e2e_{size}_ldm_decode_s"] = decode.median
                base.setdefault("ldm_decode", decode.median)
            else:
                theirs = measure(baseline, plan.timing, max_runs=3)
                theirs_s, theirs_n = theirs.median, theirs.n
        ratio = theirs_s / ours_s
        ours_flops, theirs_flops = e2e_flops(plan, gen_cfg, tok_cfg, size)
        flop_ratio = theirs_flops / ours_flops if ours_flops and theirs_flops else None
        gf = lambda f: "n/a" if f is None else f"{f / 1e9:.1f}"  # noqa: E731
        table.rows.append(
            [
                f"{size} px",
                fmt_s(ours_s),
                ours_n,
                fmt_s(theirs_s),
                theirs_n,
                fmt_x(ratio),
                gf(ours_flops),
                gf(theirs_flops),
                "n/a" if flop_ratio is None else fmt_x(flop_ratio),
            ]
        )
        table.footer.append(
            f"{size} px: binlat = sampling {fmt_s(sampling.median)} (timed alone, n={sampling.n}) "
            f"+ decode ~{fmt_s(max(ours_s - sampling.median, 0.0))}"
        )
        figures[f"e2e_{size}_binlat_s_per_image"] = ours_s
        figures[f"e2e_{size}_ldm_s_per_image"] = theirs_s
        figures[f"e2e_{size}_speedup"] = ratio
        if flop_ratio is not None:
            figures[f"e2e_{size}_flop_ratio"] = flop_ratio
    # Issue 30's target: at each size, a measured speedup at least the pipelines' FLOP ratio (a fixed number like
    # 20x at 1024 px is ruled out by the decoders' FLOPs, which dominate both sides there).
    for size in plan.e2e_sizes:
        bound = figures.get(f"e2e_{size}_flop_ratio")
        if bound is None:
            continue
        table.footer.append(target(figures[f"e2e_{size}_speedup"], round(bound, 2), f"at {size} px (the FLOP ratio)"))
    large = plan.e2e_sizes[-1]
    if f"e2e_{large}_flop_ratio" in figures:
        table.footer.append(
            f"why the FLOP ratio is the bound at {large} px: the tokenizer's decoder costs "
            f"{_decode_flops(tok_cfg, large) / 1e9:.0f} GFLOP per image, the VAE decoder "
            f"{_vae_flops(plan, large) / 1e9:.0f} GFLOP; the decoders dominate both sides, so their "
            f"FLOPs set the ratio ({fmt_x(figures[f'e2e_{large}_flop_ratio'])})"
        )
    return table


def _tokenizer_name(plan: Plan) -> str:
    if plan.e2e_tokenizer_name == "release":
        return "the release's own (presets/tokenizer/release.json)"
    return "tiny" if plan.mode == "tiny" else f"the {plan.preset.name} preset's"


def _decode_flops(tok_cfg, size: int) -> float:
    from ..tokenizer import BinaryTokenizer

    with torch.device("meta"):
        tok = BinaryTokenizer(tok_cfg)
        bits = torch.zeros(1, tok_cfg.num_tokens, tok_cfg.num_bits)
        return counted_flops(lambda: tok.decode(bits, size, size)) or 1.0


def _vae_flops(plan: Plan, size: int) -> float:
    with torch.device("meta"):
        decoder = vae(plan)
        return counted_flops(lambda: decoder.decode(torch.zeros(1, 4, size // 8, size // 8))) or 1.0


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

        return counted_flops(ours), counted_flops(lambda: baseline_image(plan, size))
