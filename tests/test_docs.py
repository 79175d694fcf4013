"""The documentation stands on its own: every relative link in README.md and docs/ resolves inside the repository,
nothing points outside it (../shared is not part of a clone), and docs/shapes.md states the constants the code uses."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from binlat.data import shapes
from binlat.judge import shapes as shapes_judge

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# [text](target "title"), ![alt](target) and reference definitions [label]: target
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|#)")  # http:, https:, mailto:, … or an anchor on the page


def _without_code(text: str) -> str:
    """Markdown outside fenced code blocks and code spans (where brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(path: Path) -> list[str]:
    text = _without_code(path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not EXTERNAL.match(t)]


def _ignored_by_git(path: Path) -> bool:
    """Whether git would leave `path` out of a commit (so out of a clone); False outside a git work tree."""
    try:
        done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def test_the_docs_are_found():
    assert ROOT / "docs" / "shapes.md" in DOCS and (ROOT / "README.md").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path):
    broken = []
    for target in relative_links(doc):
        resolved = (doc.parent / target.split("#", 1)[0]).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif _ignored_by_git(resolved):
            broken.append(f"{target}: ignored by git, so not in a clone")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_the_shared_folder(doc: Path):
    assert "../shared" not in doc.read_text(encoding="utf-8")


def test_the_link_checker_sees_links_and_only_links(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        'See [a](docs/a.md#part), ![b](img/b.png "title"), [web](https://x.org), [top](#top),\n'
        "`[not](code.md)`, and\n\n[ref]: ../c.md\n\n```\n[also not](fenced.md)\n```\n"
    )
    assert sorted(relative_links(page)) == ["../c.md", "docs/a.md#part", "img/b.png"]


def test_readme_links_the_shapes_description():
    assert "docs/shapes.md" in relative_links(ROOT / "README.md")


def test_shapes_doc_states_the_codes_constants():
    text = (ROOT / "docs" / "shapes.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (\w+) \| \((\d+, \d+, \d+)\) \|$", text, flags=re.MULTILINE))
    assert {name: tuple(int(v) for v in rgb.split(", ")) for name, rgb in table.items()} == shapes.PALETTE
    for held_colour, held_shape in shapes.HELD_OUT:
        assert f"{held_colour} {held_shape}" in text
    sizes = f"[{shapes.MIN_SIZE_FRAC} S, {shapes.MAX_SIZE_FRAC:.2f} S]"
    assert sizes in text and f"at least {shapes.RELATION_MARGIN_FRAC} S" in text
    assert f"below {shapes_judge.COLOR_THRESHOLD:.0f}" in text
    assert f"at least {shapes_judge.MIN_AREA_FRACTION} ×" in text
    assert f"at least {shapes_judge.SQUARE_CORNER_SHARE:.0%} filled" in text.replace(" %", "%")
    assert f"at least {shapes_judge.TRIANGLE_LOWER_SHARE:.0%} of its pixels" in text.replace(" %", "%")
    for category in shapes.CATEGORIES:
        assert f"| `{category}` |" in text


def own_data_block() -> list[list[str]]:
    """The README's own-data commands (between <!-- own-data --> markers), each as argv without `binlat`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- own-data -->", 1)[1].split("<!-- /own-data -->", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("binlat ")]
    return [shlex.split(line.split("#", 1)[0])[1:] for line in lines]


def test_the_readme_own_data_block_runs_verbatim_in_an_empty_folder(tmp_path, monkeypatch):
    """Issue 27: a user in an empty folder outside the repository follows the README's own-data block, with
    nothing but their images, to a generated image: the commands exactly as written, trainings cut to 2 steps."""
    from binlat import cli
    from binlat.data.shapes import ShapesStream
    from binlat.pipeline import to_pil

    commands = own_data_block()
    assert [c[0] for c in commands] == ["train", "export", "precompute", "train", "export", "bundle", "generate"]
    images = tmp_path / "my_images"
    images.mkdir()
    stream = ShapesStream(size=64, seed=0)
    for i in range(8):
        sample = stream.sample(i)
        to_pil(sample["image"][None])[0].save(images / f"shape{i}.png")
        (images / f"shape{i}.txt").write_text(sample["caption"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BINLAT_MODEL", raising=False)
    for argv in commands:
        scaled = argv + (["--max-steps", "2"] if argv[0] == "train" else [])
        assert cli.main(scaled) == 0, argv
    assert (tmp_path / "out" / "00000.png").is_file() and (tmp_path / "out" / "metadata.jsonl").is_file()
    assert not any(str(ROOT) in arg for argv in commands for arg in argv)  # no repository path in the block
    # The bundle's model card knows what its generator read: the bits, made from the user's folder, whose
    # captions' words are the vocabulary generation checks prompts against.
    import json

    from binlat.data.vocabulary import words

    card = (tmp_path / "models" / "mine" / "README.md").read_text(encoding="utf-8")
    assert "| diffusion | `data/bits` (made from `my_images/`) | 2 | 64 px |" in card
    captions = [(images / f"shape{i}.txt").read_text() for i in range(8)]
    vocabulary = json.loads((tmp_path / "models" / "mine" / "model_index.json").read_text())["vocabulary"]
    assert vocabulary["diffusion"]["words"] == sorted({w for c in captions for w in words(c)})


# --- the README's preset figures, held to `binlat params` (issue 27: they had drifted apart) -------------------
def _preset_rows() -> dict[str, list[str]]:
    """The README's preset table between its markers: preset name -> its other cells."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- presets -->", 1)[1].split("<!-- /presets -->", 1)[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:  # after the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_readme_preset_table_is_what_binlat_params_says():
    from binlat.config import preset_names
    from binlat.train.presets import preset_facts

    rows = _preset_rows()
    assert sorted(rows) == preset_names()  # every packaged preset has its row, and no row names another
    for name, cells in rows.items():
        f = preset_facts(name)
        kind, grid, size, parameters, arch = cells[:5]
        assert (kind, grid.rstrip(" ¹"), size, parameters, arch) == (
            f.kind,
            f.grid,
            f"{f.image_size} px",
            f.millions,
            f.architecture,
        ), name
        # the footnote marks exactly the rows whose grid comes from their tokenizer, not from the preset
        assert grid.endswith("¹") == (f.grid_from != "the preset"), name


def _count(kind: str, directory: Path) -> int:
    import torch

    from binlat.registry import model_class

    cls = model_class(kind)
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cls.read_config(directory)).parameters())


def test_the_readmes_other_preset_figures_are_what_binlat_params_says():
    """The prose figures outside the table: the shipped model's sizes (its bundle and its recipe's presets must
    agree), the paper's token grid, and the release's sizes quoted beside the memory table."""
    from binlat.train.presets import preset_facts

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    m = re.search(
        r"a ([\d.]+) M-parameter tokenizer \((\d+) tokens × (\d+) bits = (\d+) bytes per (\d+) px image\), "
        r"a ([\d.]+) M diffusion generator and a ([\d.]+) M AR generator",
        text,
    )
    assert m, "the shipped model's sentence moved or changed form; update this test with it"
    tok, diffusion, ar = (
        preset_facts(p) for p in ("tokenizer/shapes-64-stage1", "diffusion/shapes-64", "ar/shapes-64")
    )
    bundle = ROOT / "models" / "default"
    for said, preset, part in ((m[1], tok, "tokenizer"), (m[6], diffusion, "diffusion"), (m[7], ar, "ar")):
        assert f"{said} M" == preset.millions == f"{_count(part, bundle / part) / 1e6:.1f} M", part
    assert (int(m[2]), int(m[3]), int(m[5])) == (tok.num_tokens, tok.num_bits, tok.image_size)
    assert int(m[4]) == tok.num_tokens * tok.num_bits // 8
    paper = preset_facts("tokenizer/paper-512")
    assert f"({paper.num_tokens} tokens × {paper.num_bits} bits at {paper.image_size} px in the paper)" in text
    release, generator = preset_facts("tokenizer/release"), preset_facts("diffusion/paper-512")
    assert (
        f"a {release.parameters / 1e6:,.0f} M-parameter tokenizer, the {generator.parameters / 1e6:,.0f} "
        f"M-parameter diffusion generator"
    ) in text
    assert (f"tokenizer {release.parameters / 1e9:.2f} B, generator {generator.parameters / 1e9:.2f} B") in text
    assert f"Both sizes decode the same {release.grid} bits" in text
