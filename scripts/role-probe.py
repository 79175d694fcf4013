"""Do the frozen text encoder's states say which noun of "A REL B" is A (the subject) and which is B?

For every position caption of the shapes domain ("a circle above a square", with and without "a photo of " and
the trailing " on a white background": 96 captions), take each layer's state at the two shape nouns, and fit a
linear read-out (ridge least squares on ±1 targets) that tells the subject's state from the object's, on the
captions of two shape pairs; report its accuracy on the captions of the third pair, which it never saw (so it cannot
memorise captions), per layer. Near 1.0: the role is in the states, and a generator could read it
from one key; near 0.5: it is not, and the generator must find word order itself (a refiner, text positions).
Also reported: the same for "is this noun the one on top/left", the role combined with the relation word
(what an image row needs).

    python scripts/role-probe.py [--ridge 1.0]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    from binlat.data.shapes import RELATIONS, SHAPES
    from binlat.text import TextEncoder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ridge", type=float, default=1.0)
    args = p.parse_args()
    encoder = TextEncoder()
    captions, nouns, first_is_top_left = [], [], []
    for (a, b), rel, head, tail in itertools.product(
        itertools.permutations(SHAPES, 2), RELATIONS, ["", "a photo of "], ["", " on a white background"]
    ):
        captions.append(f"{head}a {a} {rel} a {b}{tail}")
        nouns.append((a, b))
        first_is_top_left.append(rel in ("above", "to the left of"))
    feats = encoder(captions)
    ids = [encoder.tokenizer(c)["input_ids"] for c in captions]
    noun_id = {s: encoder.tokenizer(s, add_special_tokens=False)["input_ids"] for s in SHAPES}
    assert all(len(v) == 1 for v in noun_id.values()), noun_id
    length = feats.mask.shape[1]
    rows, role, place = [], [], []
    for i, (tokens, (a, b)) in enumerate(zip(ids, nouns)):
        pad = length - len(tokens)  # features are left-padded
        pa = pad + tokens.index(noun_id[a][0])
        pb = pad + len(tokens) - 1 - tokens[::-1].index(noun_id[b][0])
        rows += [(i, pa), (i, pb)]
        role += [1.0, -1.0]
        top = 1.0 if first_is_top_left[i] else -1.0
        place += [top, -top]
    role, place = torch.tensor(role).double(), torch.tensor(place).double()
    print("layer | held-out pair | subject vs object | on top/left vs not  (accuracy on unseen captions)")
    for layer, states in enumerate(feats.layers):
        x = torch.stack([states[i, j] for i, j in rows]).double()
        x = torch.cat((x, torch.ones(len(x), 1, dtype=x.dtype)), 1)
        for held in itertools.combinations(SHAPES, 2):
            test = torch.tensor([set(nouns[i]) == set(held) for i, _ in rows])
            out = []
            for target in (role, place):
                a, y = x[~test], target[~test]
                w = torch.linalg.solve(a.T @ a + args.ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
                out.append(((x[test] @ w).sign() == target[test]).double().mean().item())
            print(f"{layer} | {'/'.join(held)} | {out[0]:.3f} | {out[1]:.3f}")


if __name__ == "__main__":
    main()
