"""Table 8: images/s of the shipped model's generation at batch 64, beside the bound its FLOPs and the measured
matmul peak set; and the FLOPs a training step does (table 5's share of peak)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .flops import counted_flops
from .harness import Table, fmt_s, matmul_peak, measure
from .inputs import prompt_pair, seeded

if TYPE_CHECKING:
    from .plan import Plan

# The shipped text encoder, all-MiniLM-L6-v2: 6 layers, width 384, feed-forward 1536 (its FLOPs are reported
# apart from the bound: a prompt is encoded once, whatever the generator does with it).
TEXT_ENCODER: dict[str, Any] = dict(name="all-MiniLM-L6-v2", layers=6, dim=384, ff=1536)
BOUND_GOAL = 0.5  # generation should reach this share of its FLOP bound


def text_encoder_flops(tokens: int) -> int:
    """Matrix-product FLOPs of one prompt of `tokens` positions through the text encoder (2 per multiply-add)."""
    t, d, ff = tokens, TEXT_ENCODER["dim"], TEXT_ENCODER["ff"]
    per_layer = 2 * t * (4 * d * d + 2 * d * ff) + 2 * 2 * t * t * d
    return TEXT_ENCODER["layers"] * per_layer


def peak_flops(plan: Plan, figures: dict[str, Any]) -> float:
    """The float32 matmul peak (FLOP/s): table 4's when it ran, else measured now."""
    if figures.get("matmul_peak_gflops"):
        return figures["matmul_peak_gflops"] * 1e9
    peak, _ = matmul_peak(plan.peak_size, torch.float32, plan.timing)
    figures["matmul_peak_gflops"] = peak / 1e9
    return peak


def generation_flops(sample_one, tok_cfg) -> dict[str, int | None]:
    """FLOPs per guided image: `sample_one()` generates one image (cond + uncond rows) and is counted as it runs,
    whatever the generator kind does; one tokenizer decode at the tokenizer's size is counted on the meta device."""
    from ..tokenizer import BinaryTokenizer

    with torch.device("meta"):
        tok = BinaryTokenizer(tok_cfg)
        size = tok_cfg.image_size
        decode = counted_flops(lambda: tok.decode(torch.zeros(1, tok_cfg.num_tokens, tok_cfg.num_bits), size, size))
    return {"generator": counted_flops(sample_one), "decode": decode}


def bench_throughput(plan: Plan, figures: dict[str, Any]) -> Table:
    from ..generators import GeneratorConfig
    from ..processes.common import make_generators
    from ..registry import generator, generator_kinds
    from ..tokenizer import BinaryTokenizer, TokenizerConfig

    tok_cfg = TokenizerConfig(**plan.shipped_tokenizer)
    gen_cfg = GeneratorConfig(**plan.shipped_generator)
    batch, size = plan.throughput_batch, tok_cfg.image_size
    table = Table(
        f"[8/8] Shipped model: generation images/s at batch {batch} vs its FLOP bound",
        ["generator", "s/batch", "n", "images/s", "GFLOP/image (gen + decode)", "bound images/s", "share of bound"],
    )
    table.notes.append(
        f"{plan.shipped_name}; random weights (the time does not depend on them); generator "
        f"{gen_cfg.num_layers}L x {gen_cfg.num_heads}H x {gen_cfg.head_dim} over {gen_cfg.num_tokens} "
        f"tokens x {gen_cfg.num_bits} bits, tokenizer decoder {tok_cfg.decoder_layers}L x "
        f"{tok_cfg.decoder_dim} at {size} px"
    )
    table.notes.append(
        f"as binlat generate runs it: one batch of {batch} prompts (guidance {plan.guidance:g}: "
        f"cond + uncond rows), diffusion {plan.steps} steps, AR its default decoding; then each image "
        f"decoded alone (as Pipeline does); text features given (the text encoder apart, below)"
    )
    peak = peak_flops(plan, figures)
    tok = seeded(lambda: BinaryTokenizer(tok_cfg), 1)
    cond, uncond = prompt_pair(plan, batch)
    small_cond, _ = prompt_pair(plan, 2)
    nets = {}
    for kind in generator_kinds():
        spec = generator(kind)
        fields = plan.generator_fields(kind, plan.shipped_generator)

        def build(spec: Any = spec, fields: dict[str, Any] = fields) -> Any:  # this iteration's kind, bound now
            return spec.network(spec.config(**fields))

        net = seeded(build)
        nets[kind] = (net, spec.sampler(net.config), spec.uses("num_steps"))
    steps = plan.throughput_steps or plan.steps
    one_cond, _ = prompt_pair(plan, 1)
    for kind, (net, process, stepped) in nets.items():
        timed = steps if stepped else None  # a stepped process is timed on `steps` of plan.steps and scaled

        def sample(c=cond, net=net, process=process, timed=timed) -> torch.Tensor:
            extra = {} if timed is None else {"num_steps": timed}
            return process.sample(
                net, c, uncond, make_generators(range(c.mask.shape[0])), guidance_scale=plan.guidance, **extra
            )

        m = measure(sample, plan.timing, warmup=(lambda: sample(small_cond)) if plan.small_warmup else None, max_runs=3)
        bits = m.result
        d = measure(lambda: [tok.decode(b[None], size, size) for b in bits], plan.timing, max_runs=3)
        scale = plan.steps / timed if timed else 1.0
        batch_s = m.median * scale + d.median
        if scale != 1.0:
            table.footer.append(
                f"{kind}: {timed} of {plan.steps} steps timed ({fmt_s(m.median)}), scaled x"
                f"{scale:g}; decode {fmt_s(d.median)} timed"
            )
        every_step = {"num_steps": plan.steps} if stepped else {}
        flops = generation_flops(
            lambda: process.sample(
                net, one_cond, uncond, make_generators([0]), guidance_scale=plan.guidance, **every_step
            ),
            tok_cfg,
        )
        sample_flops, decode_flops = flops["generator"] or 0, flops["decode"] or 0
        per_image = sample_flops + decode_flops
        rate = batch / batch_s
        bound = peak / per_image if per_image else None
        share = rate / bound if bound else None
        table.rows.append(
            [
                kind,
                fmt_s(batch_s),
                f"{m.n}+{d.n}",
                f"{rate:.1f}",
                f"{sample_flops / 1e9:.3f} + {decode_flops / 1e9:.3f}",
                "n/a" if bound is None else f"{bound:.0f}",
                "n/a" if share is None else f"{100 * share:.1f} %",
            ]
        )
        figures[f"sample_images_per_s_{kind}"] = rate
        if share is not None and share < BOUND_GOAL:  # the measured cause: which part runs far from peak
            parts = [("sampling", m.median * scale, sample_flops), ("one-image decodes", d.median, decode_flops)]
            table.footer.append(
                f"why {kind} misses: "
                + "; ".join(
                    f"{name} {fmt_s(t)} of the batch's {fmt_s(batch_s)}, at {100 * f * batch / t / peak:.0f} % of peak"
                    for name, t, f in parts
                )
            )
        figures[f"sample_flops_per_image_{kind}"] = per_image
        if share is not None:
            figures[f"sample_bound_fraction_{kind}"] = share
    text = text_encoder_flops(plan.text_length)
    figures["sample_text_encoder_flops_per_prompt"] = text
    table.footer.append(
        f"bound = measured float32 matmul peak ({peak / 1e9:.1f} GFLOP/s) / FLOPs per image "
        f"(generator steps + one decode, counted on the meta device)"
    )
    table.footer.append(
        f"text encoder apart ({TEXT_ENCODER['name']}, {plan.text_length} tokens, analytic): "
        f"{text / 1e9:.3f} GFLOP per prompt, not in the bound"
    )
    for kind in nets:
        share = figures.get(f"sample_bound_fraction_{kind}")
        if share is not None:
            table.footer.append(
                f"goal {kind} >= {100 * BOUND_GOAL:.0f} % of the bound: "
                f"{'met' if share >= BOUND_GOAL else 'NOT met'} "
                f"({100 * share:.1f} %)"
            )
    return table


def training_step_flops(kind: str, model: dict[str, Any], batch: int, text_length: int) -> int | None:
    """FLOPs of one training step: 3 x the forward pass (the backward pass counted as 2 x forward), on the meta
    device; the tokenizer's forward is encode + decode at its image size."""
    from ..registry import TOKENIZER, generator, model_class
    from ..text.encoder import TextFeatures
    from .plan import _tuples

    cls = model_class(kind)
    with torch.device("meta"):
        net = cls(cls.config_class(**_tuples(model)))
        c = net.config
        if kind == TOKENIZER:
            images = torch.zeros(batch, c.in_channels, c.image_size, c.image_size)
            forward = counted_flops(lambda: net(images))
        else:  # the kind's own training loss: the forward pass the trainer runs, whatever the kind
            text = TextFeatures(
                [torch.zeros(batch, text_length, c.text_dim)] * c.num_layers,
                torch.ones(batch, text_length, dtype=torch.bool),
            )
            bits = torch.zeros(batch, c.num_tokens, c.num_bits)
            process = generator(kind).sampler(c)
            forward = counted_flops(lambda: process.loss(net, bits, text))
    return None if forward is None else 3 * forward
