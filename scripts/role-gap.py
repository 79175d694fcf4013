"""Does a diffusion generator read the roles of "A above B"? Its loss on true renders, own caption or swapped.

For the position prompts of a prompt set (seed 1000 by default, not the published seed 0), render the true scene,
noise its bits to time t with the forward process (the same noise for both captions) and take the generator's
denoising loss in bits per image under the image's own caption and under the caption with its two nouns swapped
("a square above a circle" for a render of "a circle above a square"). The gap (swapped - own) is what the generator
knows of the roles at that noise level: 0 for a generator that reads the caption as a bag of words. Reported apart
for the leading relations ("above", "to the left of": the first noun on top or on the left) and the trailing ones
("below", "to the right of"): a generator that learned "the first noun goes on top" but not the relation's direction
has a positive gap on the first and a negative one on the second. Then, with --cfg, the judge's verdicts on images
drawn for the same prompts (20 steps, seeds 1000 + i), split the same way.

    python scripts/role-gap.py MODEL [--prompts 96] [--seed 1000] [--times 0.5,0.7,0.85,1] [--cfg 1,3]
"""

from __future__ import annotations

import argparse
import collections
import math


def main() -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from binlat.data.shapes import LEADING_RELATIONS, prompt_set, render, scene_for_caption, swap_roles, to_tensor
    from binlat.judge.shapes import judge
    from binlat.pipeline import Pipeline
    from binlat.processes.diffusion import q_probs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--times", default="0.5,0.7,0.85,1")
    parser.add_argument("--cfg", default="", help="guidance scales to draw and judge images at (none by default)")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    network, process = pipe.generators["diffusion"].float().eval(), pipe.process("diffusion")
    prompts = prompt_set("position", args.prompts, seed=args.seed)
    leading = torch.tensor([any(f" {r} " in q for r in LEADING_RELATIONS) for q in prompts])
    size = pipe.config.image_size
    images = [
        render(scene_for_caption(q, np.random.default_rng(args.seed + i), size=size)) for i, q in enumerate(prompts)
    ]
    with torch.no_grad():
        x0 = pipe.tokenizer.float().encode(torch.stack([to_tensor(im) for im in images])).float()
    layers = pipe.text_layers("diffusion")
    own = pipe.text_encoder(prompts).select(layers)
    swapped = pipe.text_encoder([swap_roles(q) for q in prompts]).select(layers)
    noise = torch.Generator().manual_seed(args.seed)
    print("t     | leading: gap (bits/image), images likelier under their own caption | trailing: the same")
    for t in (float(x) for x in args.times.split(",")):
        times = torch.full((len(prompts),), t)
        x_t = (torch.rand(x0.shape, generator=noise) < q_probs(x0, times)).float()
        nll = []
        with torch.no_grad():
            for text in (own, swapped):
                logits = process.x0_logits(network(x_t, times, text.layers, text.mask).float(), x_t)
                bce = F.binary_cross_entropy_with_logits(logits, x0, reduction="none")
                nll.append(bce.sum((1, 2)) / math.log(2))
        gap = nll[1] - nll[0]
        cells = [f"{gap[rows].mean():6.2f}, {(gap[rows] > 0).float().mean():.2f}" for rows in (leading, ~leading)]
        print(f"{t:<5g} | {cells[0]} | {cells[1]}", flush=True)
    for w in (float(x) for x in args.cfg.split(",") if x):
        out = pipe(prompts, kind="diffusion", seed=args.seed, guidance_scale=w, progress=False)
        verdicts = {True: collections.Counter(), False: collections.Counter()}
        for image, prompt, lead in zip(out.images, prompts, leading.tolist()):
            verdict = judge(image, prompt)
            verdicts[lead]["correct" if verdict["correct"] else verdict["failure"]] += 1
        both = verdicts[True] + verdicts[False]
        print(
            f"w {w:g}: position {both['correct'] / len(prompts):.2f}; holds / reversed / axis "
            f"{both['correct']} / {both['reversed']} / {both['axis']}; leading {dict(verdicts[True])}; "
            f"trailing {dict(verdicts[False])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
