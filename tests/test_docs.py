"""The documentation stands on its own: every relative link in README.md and docs/ resolves inside the repository,
nothing points outside it (../shared is not part of a clone), and docs/shapes.md states the constants the code uses."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from binlat.data import shapes
from binlat.eval import shapes_judge

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
    page.write_text('See [a](docs/a.md#part), ![b](img/b.png "title"), [web](https://x.org), [top](#top),\n'
                    "`[not](code.md)`, and\n\n[ref]: ../c.md\n\n```\n[also not](fenced.md)\n```\n")
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
