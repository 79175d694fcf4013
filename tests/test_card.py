"""Model cards (issue 27): `binlat bundle` writes README.md with the Hub's YAML front matter and the facts its parts
carry (provenance.json: data, steps, caption vocabulary; license), `binlat card` writes it again with scores, and
generation warns once about prompt words outside the training vocabulary, naming them."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from binlat.card import CARD, PROVENANCE, model_card, provenance_file, read_provenance, run_provenance
from binlat.cli import main
from binlat.data.shapes import vocabulary as shapes_words
from binlat.data.vocabulary import vocabulary_of, words
from binlat.official import RELEASE_LICENSE, release_provenance
from binlat.pipeline import Pipeline
from binlat.text import TextEncoder


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def front_matter(card: str) -> dict:
    """The card's YAML front matter, parsed by PyYAML where it is installed, else by hand (keys, scalars, lists)."""
    assert card.startswith("---\n"), card[:40]
    head = card[4:].split("\n---\n", 1)[0]
    try:
        import yaml
    except ImportError:
        data, key = {}, None
        for line in head.splitlines():
            if line.startswith("- "):
                data[key].append(json.loads(line[2:]) if line[2] == '"' else line[2:])
            else:
                key, _, value = line.partition(":")
                value = value.strip()
                data[key] = [] if not value else json.loads(value) if value.startswith('"') else value
        return data
    return yaml.safe_load(head)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def parts(tmp_path_factory, encoder) -> Path:
    """A tiny model's parts as exports leave them: the diffusion generator trained on `shapes`, the AR generator on a
    folder of captioned images, the tokenizer with no provenance at all (made before binlat recorded it)."""
    root = tmp_path_factory.mktemp("parts")
    Pipeline.random_tiny(text_encoder=encoder).save_pretrained(root / "parts")
    images = root / "my_images"
    images.mkdir()
    for name, caption in (("a", "A cat, on a sofa."), ("b", "two dogs"), ("c", "")):
        (images / f"{name}.png").write_bytes(b"")  # only the captions are read for the vocabulary
        (images / f"{name}.txt").write_text(caption)
    for kind, data in (("diffusion", "shapes:color_attr=2"), ("ar", str(images))):
        info = run_provenance(
            {"kind": kind, "data": data, "image_size": 64, "generator": {"text_encoder": "all-MiniLM-L6-v2"}}, 40
        )
        (root / "parts" / kind / PROVENANCE).write_bytes(provenance_file(info)[PROVENANCE])
    return root / "parts"


@pytest.fixture(scope="module")
def bundle(parts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert (
        main(
            [
                "bundle",
                "--tokenizer",
                str(parts / "tokenizer"),
                "--diffusion",
                str(parts / "diffusion"),
                "--ar",
                str(parts / "ar"),
                "--description",
                "tiny test model",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_vocabulary_of_data_specs(parts, tmp_path) -> None:
    assert (
        vocabulary_of("shapes")
        == vocabulary_of("shapes:seed=3,position=2")
        == {"source": "shapes", "words": list(shapes_words())}
    )
    assert "circles" in shapes_words() and "cat" not in shapes_words()
    folder = vocabulary_of(str(parts.parent / "my_images"))
    assert folder["words"] == ["a", "cat", "dogs", "on", "sofa", "two"]  # lower-cased, punctuation dropped
    assert vocabulary_of("shards-{000..009}.tar") is None and vocabulary_of(str(tmp_path / "gone")) is None
    assert words("Don't  draw a RED circle!") == ["don't", "draw", "a", "red", "circle"]


def test_bundle_writes_a_card_with_hub_front_matter(bundle) -> None:
    card = (bundle / CARD).read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "binlat"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"binlat", "text-to-image", "diffusion", "ar"} <= set(meta["tags"])
    body = card.split("\n---\n", 1)[1]
    assert "# tiny test model" in body and "16 tokens × 32 bits" in body
    assert "| diffusion | `shapes:color_attr=2` | 40 | 64 px |" in body
    assert "| tokenizer | unknown" in body  # no provenance: said, not guessed
    assert "the built-in `shapes` data, 28 words: a, above," in body
    assert "6 words: a, cat, dogs, on, sofa, two." in body
    assert "None measured" in body and "binlat eval shapes --model DIR" in body and "binlat card DIR" in body
    assert "binlat's license, Apache-2.0" in body
    index = json.loads((bundle / "model_index.json").read_text())
    assert index["vocabulary"]["diffusion"] == {"source": "shapes", "words": list(shapes_words())}
    assert index["vocabulary"]["ar"]["words"] == ["a", "cat", "dogs", "on", "sofa", "two"]
    assert read_provenance(bundle / "diffusion")["data"] == "shapes:color_attr=2"  # carried into the bundle


def test_card_command_adds_the_scores_of_reports_on_this_bundle(bundle, tmp_path, capsys) -> None:
    evals = tmp_path / "eval"
    code, _, err = run(
        capsys,
        "eval",
        "shapes",
        "--model",
        bundle,
        "--ground-truth",
        "--per-category",
        1,
        "--no-held-out",
        "--no-progress",
        "--out",
        evals / "ceiling",
    )
    assert code == 0, err
    other = evals / "other"
    other.mkdir()
    report = json.loads((evals / "ceiling" / "report-shapes.json").read_text())
    (other / "report-shapes.json").write_text(json.dumps(report | {"model": str(tmp_path / "elsewhere")}))
    code, out, err = run(capsys, "card", bundle, "--eval", evals)
    assert code == 0, err
    assert "left 1 report(s) of other models off the card" in err and "other" in err
    body = (bundle / CARD).read_text(encoding="utf-8")
    overall = f"{report['summary']['overall']:.2f}"
    assert (
        f"| `shapes`, tokenizer ceiling (true renders, round trip), 1 prompts per category, seed 0 | {overall} |"
        in body
    )
    assert "None measured" not in body and str(other) not in body
    assert front_matter(body)["library_name"] == "binlat"  # written again whole
    code, _, err = run(capsys, "card", tmp_path / "nothing")
    assert code != 0 and "Traceback" not in err and "not a binlat bundle" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "shapes", "summary": {}}))
    for given, needle in ((bad, "not a binlat eval report"), (tmp_path / "gone", "no such report file or folder")):
        code, _, err = run(capsys, "card", bundle, "--eval", given)
        assert code != 0 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert (bundle / CARD).read_text(encoding="utf-8") == body  # refused before anything was written


def test_generate_warns_once_naming_the_words_outside_the_vocabulary(bundle, tmp_path, capsys) -> None:
    code, _, err = run(
        capsys,
        "generate",
        "a cat on a sofa",
        "a red circle",
        "a cat",
        "--model",
        bundle,
        "--steps",
        1,
        "--out",
        tmp_path / "o",
        "--no-progress",
    )
    assert code == 0, err
    warned = [line for line in err.splitlines() if "vocabulary" in line]
    assert len(warned) == 1, err
    assert warned[0].startswith('warning: "cat", "sofa" are not in this model\'s training vocabulary (shapes: a,')
    assert warned[0].endswith("expect a blank or unrelated image")
    code, _, err = run(
        capsys,
        "generate",
        "a red circle above a blue square",
        "--model",
        bundle,
        "--steps",
        1,
        "--out",
        tmp_path / "o",
        "--no-progress",
    )
    assert code == 0 and "vocabulary" not in err  # every word is one the model read
    # AR has its own words: "cat" and "sofa" are among them, "red" is not
    code, _, err = run(
        capsys,
        "generate",
        "a red cat",
        "--generator",
        "ar",
        "--model",
        bundle,
        "--out",
        tmp_path / "o",
        "--no-progress",
    )
    assert code == 0 and '"red" is not in' in err and '"cat"' not in err


def test_pipeline_warns_once_per_word_and_old_bundles_not_at_all(bundle, encoder) -> None:
    pipe = Pipeline.from_pretrained(bundle, text_encoder=encoder)
    with pytest.warns(UserWarning, match='"sofa" is not in this model'):
        pipe(["a sofa", "a circle"], num_steps=1, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same word again: no second warning
        pipe(["a sofa"], num_steps=1, seed=0, progress=False)
        old = Pipeline.random_tiny(text_encoder=encoder)  # no vocabulary: nothing is checked
        old(["a cat on a sofa"], num_steps=1, seed=0, progress=False)
    assert old.warn_vocabulary(["a cat"]) == []
    with pytest.warns(UserWarning, match='"dog" is not'):
        assert pipe.warn_vocabulary(["a dog", "a sofa"]) == ["dog"]  # only the word not named before


def test_a_card_of_converted_weights_names_the_release_and_its_license() -> None:
    parts = {
        "tokenizer": release_provenance("tokenizer"),
        "diffusion": release_provenance("diffusion"),
        "ar": run_provenance({"kind": "ar", "data": "shapes", "image_size": 64, "generator": {}}, 10),
    }
    index = {"text_encoder": "amd/AMD-OLMo-1B", "generators": ["diffusion", "ar"], "description": ""}
    card = model_card(index, {"num_tokens": 128, "num_bits": 64, "image_size": 1024}, parts)
    meta = front_matter(card)
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other",
        RELEASE_LICENSE["name"],
        RELEASE_LICENSE["link"],
    )
    assert meta["base_model"] == "amd/Instella-T2I"
    assert "The tokenizer and diffusion weights are converted from `amd/Instella-T2I`" in card
    assert RELEASE_LICENSE["title"] in card and "LAION-COCO" in card
    assert "The ar weights were made with binlat" in card
    assert "- diffusion: unknown (open-domain or unrecorded captions)" in card
