"""Hard-negative captions for word order (generator.role_contrast): which captions have a negative, the term's
values, that both processes add it on the rows given from the same noise (and leave the loss bit for bit as it was
without them), and that its gradient teaches a network to tell a caption from its negative. The trainer's side (the
rows a batch gives, float16 rounding of precomputed text) is in test_train_loop.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from binlat.data.shapes import role_negative
from binlat.generators import ARConfig, ARTransformer, DiffusionTransformer
from binlat.processes import ARDecoding, BernoulliDiffusion
from binlat.processes.ar import image_nll, teacher_forced_logits
from binlat.processes.common import Negatives, contrast_term, make_generators
from binlat.text import TextFeatures
from processes_support import AR_CFG, CFG, SHARED, randomise, text


def test_role_negative_swaps_the_two_objects_of_a_position_caption_only() -> None:
    assert role_negative("a circle above a square") == "a square above a circle"
    assert (
        role_negative("a photo of a triangle to the left of a circle on a white background")
        == "a photo of a circle to the left of a triangle on a white background"
    )
    for other in ("a circle", "a red square", "a circle and a square", "three triangles", ""):
        assert role_negative(other) is None, other
    assert role_negative("a circle above a square above a triangle") is None  # two relations: no single swap


def test_contrast_term_is_log_2_per_row_at_no_gap_and_vanishes_for_a_clear_one() -> None:
    own = torch.tensor([5.0, 7.0])
    same = contrast_term(own, own.clone(), batch=4)
    assert math.isclose(same["contrast"].item(), 2 * math.log(2) / 4, rel_tol=1e-6)
    assert same["role_gap"].item() == 0
    clear = contrast_term(own, own + 40, batch=4)
    assert clear["contrast"].item() < 1e-15 and clear["role_gap"].item() == 40
    wrong = contrast_term(own, own - 3, batch=2)  # the negative likelier: about the gap itself, per row
    assert math.isclose(wrong["contrast"].item(), F.softplus(torch.tensor(3.0)).item(), rel_tol=1e-6)
    empty = contrast_term(own[:0], own[:0], batch=4)
    assert empty["contrast"].item() == 0 and empty["role_gap"].item() == 0


def _bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, SHARED["num_tokens"], SHARED["num_bits"], generator=g) < 0.5).float()


def _own_and_other(n: int) -> tuple[TextFeatures, TextFeatures]:
    own = text([5, 3, 4, 5][:n], seed=1)
    other = text([4, 5, 3, 5][:n], seed=2)
    return own, other


def _diffusion() -> tuple[DiffusionTransformer, BernoulliDiffusion]:
    torch.manual_seed(0)
    return randomise(DiffusionTransformer(CFG), 3), BernoulliDiffusion(prediction="x0", contrast_weight=0.5)


@pytest.mark.parametrize("kind", ["diffusion", "ar", "ar-grouped"])
def test_the_term_is_added_on_the_given_rows_from_the_same_noise(kind: str) -> None:
    """Negatives on rows 1 and 3: the loss is the plain loss (bit for bit) plus contrast_weight times the term on
    those rows' NLLs, each computed here by hand from the same x_t (diffusion) or context (AR)."""
    x0, (own, other) = _bits(4, 7), _own_and_other(4)
    rows = torch.tensor([1, 3])
    negatives = Negatives(rows, other.index(rows))
    if kind == "diffusion":
        net, process = _diffusion()
        t = torch.tensor([0.3, 0.6, 0.8, 0.95])
        noise = torch.rand(x0.shape, generator=torch.Generator().manual_seed(5))
        plain, _ = process.loss(net, x0, own, t=t, noise=noise)
        loss, metrics = process.loss(net, x0, own, t=t, noise=noise, negatives=negatives)
        x_t = (noise < x0 * (1 - t.view(-1, 1, 1)) + t.view(-1, 1, 1) / 2).float()

        def nll(features: TextFeatures) -> torch.Tensor:
            logits = net(x_t[rows], t[rows], features.layers, features.mask).float()
            return F.binary_cross_entropy_with_logits(logits, x0[rows], reduction="none").sum((1, 2))

    else:
        cfg = ARConfig(**{**SHARED, "num_bits": 8}, bit_groups=2) if kind == "ar-grouped" else AR_CFG
        torch.manual_seed(0)
        net, process = randomise(ARTransformer(cfg), 3), ARDecoding(contrast_weight=0.5)
        plain, _ = process.loss(net, x0, own)
        loss, metrics = process.loss(net, x0, own, negatives=negatives)
        groups = cfg.bit_groups

        def nll(features: TextFeatures) -> torch.Tensor:
            logits = teacher_forced_logits(net, x0[rows][:, :-1], x0[rows], features, groups)
            return image_nll(logits, x0[rows], groups)

    own_rows = own.index(rows)
    gap = nll(negatives.text) - nll(own_rows)
    assert torch.allclose(metrics["role_gap"], gap.mean(), atol=1e-4)
    term = F.softplus(-gap).sum() / 4
    assert torch.allclose(metrics["contrast"], term, atol=1e-5)
    assert torch.allclose(loss, plain + 0.5 * term, atol=1e-6)
    unweighted = BernoulliDiffusion(prediction="x0") if kind == "diffusion" else ARDecoding()
    given = {"t": t, "noise": noise} if kind == "diffusion" else {}
    same, metrics_off = unweighted.loss(net, x0, own, negatives=negatives, **given)
    assert torch.equal(same, plain) and "contrast" not in metrics_off  # weight 0: the release's loss, no term


def test_a_batch_without_negatives_keeps_the_metric_names() -> None:
    """Every step of a run with the term logs the same names (processes average them together), even when no row
    of its batch has a negative."""
    net, process = _diffusion()
    x0, (own, _) = _bits(2, 7), _own_and_other(2)
    none = Negatives(torch.zeros(0, dtype=torch.long), own.index([]))
    loss, metrics = process.loss(net, x0, own, make_generators([1, 2]), negatives=none)
    plain, _ = process.loss(net, x0, own, make_generators([1, 2]))
    assert torch.equal(loss, plain) and metrics["contrast"].item() == 0 and metrics["role_gap"].item() == 0


def test_the_terms_gradient_teaches_a_network_to_tell_a_caption_from_its_negative() -> None:
    """From a network that reads both captions alike (role_gap ~ 0 on held-out noise), steps on the term alone
    make the images likelier under their own caption than under the negative on fresh noise."""
    net, _ = _diffusion()
    net.train()
    process = BernoulliDiffusion(prediction="x0", contrast_weight=1.0)
    x0, (own, other) = _bits(4, 7), _own_and_other(4)
    rows = torch.arange(4)
    negatives = Negatives(rows, other)

    def held_out_gap() -> float:
        with torch.no_grad():
            _, m = process.loss(net, x0, own, make_generators([100, 101, 102, 103]), negatives=negatives)
        return m["role_gap"].item()

    before = held_out_gap()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(30):
        _, metrics = process.loss(net, x0, own, make_generators([4 * step + i for i in range(4)]), negatives=negatives)
        optimizer.zero_grad()
        metrics["contrast"].backward()
        optimizer.step()
    after = held_out_gap()
    assert after > before + 5, (before, after)
