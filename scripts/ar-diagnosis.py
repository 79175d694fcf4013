"""Where the AR generator goes wrong: does the model prefer the true renders or its own samples?

For the probe prompt set (16 per category, seed 1000), score under the AR network (teacher forcing, conditional,
no guidance) the bits of (a) the true renders through the tokenizer and (b) the generator's own samples at the
bundle's settings, as bits of negative log-likelihood per token. If the model gives its own broken samples a lower
NLL than the truth, the model is wrong; if it prefers the truth, sampling is what goes wrong.

And the model's reading of the caption, by likelihood alone: for each true render, whether the model gives it a
lower NLL under its own caption than under a caption that differs in one thing: position, the two objects swapped
("a circle above a square" against "a square above a circle"); color_attr, the two colours swapped; counting,
another count; colors, another colour. 50 % is a model that cannot tell the two captions apart.

Also reported: the NLL by token position (quarters of the sequence), and how sharp the model's probabilities are on
true contexts (the share of the head's units it is sure of, its most likely value at p > 0.95; a unit is a bit, or
with a grouped head, model.bit_groups > 1, a group of bits): the release's head samples a token's 16 bits
independently, so an unsure bit pattern gets mixed (a token of mixed colour). Either head's token NLL is the sum of
its units' (binlat.processes.ar.teacher_forced).

With --rerank N: N samples per prompt (seeds seed + 7919 j), and the accuracy of keeping the one with the lowest
conditional NLL, or the best likelihood ratio to the empty caption, against one sample and an oracle pick.

    python scripts/ar-diagnosis.py [--model models/default] [--per-category 16] [--seed 1000] [--rerank N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def token_nll_bits(network, bits: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] bits of NLL of each token under the network, teacher forced on `bits` itself, and [N, K] the share
    of each token's units (bits, or groups of a grouped head) whose most likely value has p > 0.95."""
    from binlat.processes.ar import teacher_forced

    log_p, top = teacher_forced(network, bits, text)
    return -log_p.sum(-1) / math.log(2), (top > 0.95).float().mean(-1)


COUNTS = ("two", "three", "four")


def alternative(prompt: str, category: str) -> str | None:
    """The caption that differs from `prompt` in the one thing its category tests, or None."""
    from binlat.data.shapes import COLORS, swap_roles

    words = prompt.split(" ")
    if category == "position":
        return swap_roles(prompt)
    if category == "color_attr":
        first, second = [i for i, w in enumerate(words) if w in COLORS]
        words[first], words[second] = words[second], words[first]
    elif category == "counting":
        i = next(i for i, w in enumerate(words) if w in COUNTS)
        words[i] = COUNTS[(COUNTS.index(words[i]) + 1) % len(COUNTS)]
    elif category == "colors":
        i = next(i for i, w in enumerate(words) if w in COLORS)
        words[i] = COLORS[(COLORS.index(words[i]) + 1) % len(COLORS)]
    else:
        return None
    return " ".join(words)


def rerank(pipe, network, layers, prompts, seed: int, n: int) -> dict:
    from binlat.judge.shapes import judge

    cond, uncond = pipe.encode_prompts(prompts)
    cond, empty = cond.select(layers), uncond.select(layers).index([0] * len(prompts))
    correct, nll_cond, ratio = [], [], []
    for j in range(n):
        out = pipe(prompts, kind="ar", seed=seed + 7919 * j, return_bits=True, progress=False)
        correct.append(torch.tensor([judge(im, q)["correct"] for im, q in zip(out.images, prompts)]).float())
        c = token_nll_bits(network, out.bits.float(), cond)[0].sum(1)
        nll_cond.append(c)
        ratio.append(c - token_nll_bits(network, out.bits.float(), empty)[0].sum(1))
    correct, nll_cond, ratio = torch.stack(correct), torch.stack(nll_cond), torch.stack(ratio)
    rows = torch.arange(len(prompts))
    return {
        "samples_per_prompt": n,
        "one_sample": round(correct.mean().item(), 3),
        "lowest_conditional_nll": round(correct[nll_cond.argmin(0), rows].mean().item(), 3),
        "best_ratio_to_empty_caption": round(correct[ratio.argmin(0), rows].mean().item(), 3),
        "oracle": round(correct.max(0).values.mean().item(), 3),
    }


def main() -> None:
    import numpy as np

    from binlat.data.shapes import CATEGORIES, prompt_set, render, scene_for_caption, to_tensor
    from binlat.judge.shapes import judge
    from binlat.pipeline import Pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/default")
    p.add_argument("--per-category", type=int, default=16)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--rerank", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    network, layers = pipe.generators["ar"], pipe.text_layers("ar")
    prompts = [q for c in CATEGORIES for q in prompt_set(c, args.per_category, seed=args.seed)]
    renders = [
        render(scene_for_caption(q, np.random.default_rng(args.seed + i), size=pipe.config.image_size))
        for i, q in enumerate(prompts)
    ]
    with torch.inference_mode():
        true_bits = torch.cat(
            [
                pipe.tokenizer.encode(torch.stack([to_tensor(r) for r in renders[s : s + 32]]))
                for s in range(0, len(renders), 32)
            ]
        ).float()
    out = pipe(prompts, kind="ar", seed=args.seed, return_bits=True, progress=False)
    own_bits = out.bits.float()
    own_ok = torch.tensor([judge(im, q)["correct"] for im, q in zip(out.images, prompts)])
    text = pipe.encode_prompts(prompts)[0].select(layers)
    true_nll, true_sure = token_nll_bits(network, true_bits, text)
    own_nll, own_sure = token_nll_bits(network, own_bits, text)
    k = true_nll.shape[1]
    quarters = [slice(i * k // 4, (i + 1) * k // 4) for i in range(4)]

    def row(nll, sure, which):
        return {
            "images": int(which.sum()),
            "nll_bits_per_token": round(nll[which].mean().item(), 3),
            "nll_by_quarter": [round(nll[which][:, q].mean().item(), 3) for q in quarters],
            "sure_bits": round(sure[which].mean().item(), 3),
        }

    everyone = torch.ones(len(prompts), dtype=torch.bool)
    categories = [c for c in CATEGORIES for _ in range(args.per_category)]
    reading = {}
    for category in ("colors", "counting", "position", "color_attr"):
        where = [i for i, c in enumerate(categories) if c == category]
        other = pipe.encode_prompts([alternative(prompts[i], category) for i in where])[0].select(layers)
        right = pipe.encode_prompts([prompts[i] for i in where])[0].select(layers)
        nll_right = token_nll_bits(network, true_bits[where], right)[0].sum(1)
        nll_other = token_nll_bits(network, true_bits[where], other)[0].sum(1)
        reading[category] = {
            "renders": len(where),
            "own_caption_preferred": int((nll_right < nll_other).sum()),
            "mean_gap_bits_per_image": round((nll_other - nll_right).mean().item(), 2),
        }
    report = {
        "model": args.model,
        "prompts": len(prompts),
        "seed": args.seed,
        "sampling": pipe.sampling_settings("ar"),
        "own_accuracy": round(own_ok.float().mean().item(), 3),
        "true_renders": row(true_nll, true_sure, everyone),
        "own_samples": row(own_nll, own_sure, everyone),
        "own_correct": row(own_nll, own_sure, own_ok),
        "own_wrong": row(own_nll, own_sure, ~own_ok),
        "true_of_wrong": row(true_nll, true_sure, ~own_ok),
        # per prompt: does the model give the truth a lower NLL than its own (wrong) sample?
        "wrong_where_truth_preferred": int((true_nll.sum(1) < own_nll.sum(1))[~own_ok].sum()),
        # the caption: a true render is likelier under its own caption than under the altered one
        "caption_reading": reading,
    }
    if args.rerank:
        report["rerank"] = rerank(pipe, network, layers, prompts, args.seed, args.rerank)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
