"""The shipped default model (models/default) and its published evaluation (docs/eval, the README table).

The README's figures come from the reports under docs/eval; these tests check that the bundle is the one the
reports describe (complete, small, the default of `binlat generate`), that the README table says what the reports
say, and re-measure a slice of each figure live so that a change to the code or the weights that degrades the model
fails here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from binlat import pipeline as pipeline_mod
from binlat.data.shapes import ShapesStream
from binlat.eval.reconstruction import EVAL_SHAPES_SEED
from binlat.judge.shapes import judge
from binlat.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
REPORTS = ROOT / "docs" / "eval"


def report(name: str) -> dict:
    return json.loads(
        (REPORTS / name / f"report-{'reconstruction' if name == 'reconstruction' else 'shapes'}.json").read_text()
    )


@pytest.fixture(scope="module")
def shipped() -> Pipeline:
    return Pipeline.from_pretrained(MODEL)


def test_bundle_is_complete_trained_and_under_40_mb() -> None:
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["trained"] is True and sorted(index["generators"]) == ["ar", "diffusion"]
    assert index["text_encoder"] == "all-MiniLM-L6-v2"
    total = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert total < 40_000_000, f"{total / 1e6:.1f} MB"


def test_it_is_the_default_of_generate(monkeypatch) -> None:
    monkeypatch.delenv("BINLAT_MODEL", raising=False)
    assert pipeline_mod.default_model_dir() == MODEL


def readme_rows() -> dict[str, list[str]]:
    """The rows of the README's shipped-model table, keyed by their first cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The shipped model", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 2 and not set(cells[1]) <= set("-: "):
            rows[cells[0]] = cells[1:]
    return rows


def test_readme_table_is_what_the_reports_say() -> None:
    rows = readme_rows()
    for name in ("diffusion", "ar", "ceiling"):
        summary = report(name)["summary"]
        cats = list(summary["accuracy"])
        want = [f"{summary['overall']:.2f}"] + [f"{summary['accuracy'][c]:.2f}" for c in cats]
        held = summary["held_out"]["overall"]
        want.append("—" if held is None else f"{held:.2f}")
        label = next(k for k in rows if k.lower().startswith(name if name != "ceiling" else "tokenizer ceiling"))
        assert rows[label][: len(want)] == want, (name, rows[label], want)
    rec = report("reconstruction")["summary"]
    label = next(k for k in rows if k.startswith("PSNR"))
    assert rows[label][:3] == [f"{rec[k]['psnr']:.2f}" for k in ("tokenizer", "jpeg", "webp")]


def test_tokenizer_round_trip_measures_as_reported(shipped) -> None:
    stream = ShapesStream(size=64, seed=EVAL_SHAPES_SEED)
    images = torch.stack([stream.sample(i)["image"] for i in range(32)])
    with torch.inference_mode():
        recon = shipped.tokenizer.decode(shipped.tokenizer.encode(images), 64, 64).clamp(-1, 1)
    recon = ((recon + 1) * 127.5).round() / 127.5 - 1  # as saved: 8-bit pixels
    psnr = 10 * math.log10(4.0 / F.mse_loss(recon, images).item())
    assert psnr >= report("reconstruction")["summary"]["tokenizer"]["psnr"] - 1.0


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_generators_reproduce_the_published_verdicts(shipped, kind) -> None:
    """The first 4 items of every category of the published report, regenerated with their prompt and seed and
    judged again: the verdicts (correct or not, and the objects found) agree. Float rounding on another CPU may
    flip a rare sampled bit, so 90 % agreement is required rather than all."""
    items = [it for it in report(kind)["items"] if it["set"] == "main" and it["index"] < 4]
    assert len(items) == 24
    agree = 0
    for it in items:
        image = shipped([it["prompt"]], kind=kind, seed=it["seed"], progress=False).images[0]
        verdict = judge(image, it["prompt"])
        agree += bool(verdict["correct"]) == it["correct"] and len(verdict["objects"]) == len(it["objects"])
    assert agree >= 0.9 * len(items), f"{agree}/{len(items)} verdicts reproduced"


def test_its_model_card_is_what_binlat_card_writes(monkeypatch) -> None:
    """models/default/README.md is the card `binlat card models/default --eval docs/eval` writes (run from the
    repository's root) from its parts' provenance and the published reports; its index keeps the shapes words."""
    from binlat.card import CARD, find_reports, model_card, read_provenance
    from binlat.data.shapes import vocabulary

    monkeypatch.chdir(ROOT)  # the reports name the model as the commands did: models/default
    index = json.loads((MODEL / "model_index.json").read_text())
    tokenizer = json.loads((MODEL / "tokenizer" / "config.json").read_text())
    parts = {kind: read_provenance(MODEL / kind) for kind in ("tokenizer", *index["generators"])}
    assert all(parts.values()), "every shipped part records where it came from"
    reports, _ = find_reports(["docs/eval"], "models/default")
    assert sorted(Path(p).parent.name for p, _ in reports) == ["ar", "ceiling", "diffusion", "reconstruction"]
    want = model_card(index, tokenizer, parts, reports)
    assert (MODEL / CARD).read_text(encoding="utf-8") == want, (
        "models/default/README.md is stale: run `binlat card models/default --eval docs/eval` from the repository root"
    )
    assert index["vocabulary"] == {k: {"source": "shapes", "words": list(vocabulary())} for k in ("diffusion", "ar")}
