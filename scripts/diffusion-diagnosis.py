"""Where along the noise the diffusion generator loses a relation: redraw true renders from partial noise.

For the position prompts of a prompt set (seed 1000 by default, not the published seed 0), render the true scene,
noise its bits with the forward process to time t = strength and let the generator denoise them (`binlat edit`,
SDEdit in bit space), then judge the result. Two captions per image:
- its own caption: how much of a true layout the generator keeps, and from which noise level on it draws the
  scene itself (strength 1 is plain generation: the input no longer matters);
- the caption with the two objects swapped ("a square above a circle" for a render of "a circle above a square"):
  whether the generator reads the roles enough to undo a layout that contradicts them.
Each row gives the judge's verdicts over the images: correct, and the failures (count, attributes: "the same shape
twice" is one of these, reversed, axis).

    python scripts/diffusion-diagnosis.py [--model models/default] [--per-category 32] [--seed 1000]
        [--strengths 0.5,0.7,0.8,0.9,0.95,1] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json


def main() -> None:
    import numpy as np

    from binlat.data.shapes import prompt_set, render, scene_for_caption, swap_roles
    from binlat.editing import edit
    from binlat.judge.shapes import judge
    from binlat.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/default")
    parser.add_argument("--per-category", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--strengths", default="0.5,0.7,0.8,0.9,0.95,1")
    parser.add_argument("--json", default=None, help="write the table here as JSON")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    prompts = prompt_set("position", args.per_category, seed=args.seed)
    size = pipe.config.image_size
    renders = [
        render(scene_for_caption(q, np.random.default_rng(args.seed + i), size=size)) for i, q in enumerate(prompts)
    ]
    rows = []
    for caption_kind in ("own", "swapped"):
        for strength in (float(s) for s in args.strengths.split(",")):
            verdicts = collections.Counter()
            for i, (prompt, image) in enumerate(zip(prompts, renders)):
                caption = prompt if caption_kind == "own" else swap_roles(prompt)
                out = edit(pipe, image, caption, strength, seed=args.seed + i).images[0]
                verdict = judge(out, caption)
                verdicts["correct" if verdict["correct"] else verdict["failure"]] += 1
            row = {"caption": caption_kind, "strength": strength, "images": len(prompts), **verdicts}
            rows.append(row)
            counts = "  ".join(f"{k} {verdicts[k]:3d}" for k in ("correct", "count", "attributes", "reversed", "axis"))
            print(f"{caption_kind:8s} t={strength:<5g} {counts}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "seed": args.seed, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
