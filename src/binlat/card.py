"""Model cards: a bundle's README.md, with the YAML front matter the Hugging Face Hub reads, and the facts behind it.

A model directory may carry `provenance.json`, written where it was made: `binlat export` records its run's data
spec, steps, image size, text encoder and the vocabulary of its captions (binlat.data.vocabulary);
`convert-official` records the release it came from and that release's license (binlat.official). `binlat
bundle` copies each part's file into the bundle, keeps the generators' vocabularies in model_index.json
("vocabulary", which Pipeline.warn_vocabulary reads) and writes README.md from these facts and from the evaluation
reports given to it; `binlat card DIR` writes both again (after an evaluation, or for a bundle made before cards).
A part without provenance is "unknown" on the card, never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .bundle import INDEX_NAME, PipelineConfig, check_vocabulary, write_index
from .registry import TOKENIZER

PROVENANCE = "provenance.json"
CARD = "README.md"
PROJECT_LICENSE = "Apache-2.0"  # pyproject.toml's; the installed metadata's wins (project_license)
CARD_WORDS = 60  # words of a vocabulary the card lists (model_index.json keeps them all)


# --- provenance ---------------------------------------------------------------------------------------------------
def provenance_file(info: Mapping[str, Any]) -> dict[str, bytes]:
    """{PROVENANCE: its bytes}: the `files` argument of save_pretrained."""
    return {PROVENANCE: (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}


def _made_from(spec: str) -> str | None:
    """The data a precomputed folder was made from (its index's "data"), or None."""
    from .data.precomputed import INDEX

    index = Path(str(spec).removeprefix("precomputed:")).expanduser() / INDEX
    try:
        return str(json.loads(index.read_text(encoding="utf-8")).get("data") or "") or None
    except (OSError, ValueError, AttributeError):
        return None


def run_provenance(config: Mapping[str, Any], step: int | None) -> dict[str, Any]:
    """What a model exported from a run records of itself: `config` is the run's TrainConfig as a dict (a
    checkpoint's state.json keeps it), `step` the checkpoint's step."""
    from .data.vocabulary import vocabulary_of

    kind, data = config.get("kind"), str(config.get("data") or "")
    is_generator = kind != TOKENIZER
    options = (config.get("generator") if is_generator else config.get("tokenizer")) or {}
    return {
        "kind": kind,
        "made_by": "binlat train",
        "data": data,
        "data_from": _made_from(data),
        "steps": step,
        "image_size": config.get("image_size"),
        "text_encoder": options.get("text_encoder") if is_generator else None,
        "init_from": options.get("init_from"),
        "vocabulary": vocabulary_of(data) if is_generator else None,
    }


def read_provenance(directory: str | Path) -> dict[str, Any] | None:
    """A model directory's provenance.json, or None where it has none (or an unreadable one: the card then says
    unknown rather than failing a bundle over a note)."""
    from .io import read_bounded

    path = Path(directory) / PROVENANCE
    if not path.is_file():
        return None
    try:
        info = json.loads(read_bounded(path, what="provenance").decode("utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def bundle_vocabulary(parts: Mapping[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Generator kind -> the vocabulary of its training captions, for the generators whose provenance knows it."""
    out = {}
    for kind, info in parts.items():
        vocabulary = (info or {}).get("vocabulary")
        if kind != TOKENIZER and vocabulary:
            check_vocabulary(vocabulary, f"{kind}/{PROVENANCE}")
            out[kind] = vocabulary
    return out


# --- reports ------------------------------------------------------------------------------------------------------
def _measured(report_model: str | None, bundle: Path) -> bool:
    """Whether a report's "model" names `bundle`: the same folder, or a relative path that ends the bundle's."""
    if not report_model:
        return False
    given = Path(report_model)
    if given.resolve() == bundle.resolve():
        return True
    return not given.is_absolute() and bundle.resolve().parts[-len(given.parts) :] == given.parts


def find_reports(paths: Iterable[str | Path], bundle: str | Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """Evaluation reports among `paths`, sorted by path: a report file named there is taken as it is (whoever names
    it vouches for it), and of the report-*.json files below a folder those that measured `bundle` (each report
    names its model). Also returns the paths of the folder's reports that measured another model."""
    from .io import read_bounded

    found: list[tuple[str, Any]] = []
    other: list[tuple[str, Any]] = []
    for given in paths:
        given = Path(given)
        if not given.exists():
            raise FileNotFoundError(f"--eval {given}: no such report file or folder")
        files = sorted(given.rglob("report-*.json")) if given.is_dir() else [given]
        if given.is_dir() and not files:
            raise FileNotFoundError(f"--eval {given}: no report-*.json below it (binlat eval ... --out writes one)")
        for file in files:
            try:
                report = json.loads(read_bounded(file, what="report").decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise ValueError(f"--eval {file}: not a binlat eval report (not JSON)") from None
            try:
                _score_row(str(file), report)  # a report the card cannot read is refused now, naming it
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                why = f"no {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"--eval {file}: not a binlat eval report ({why})") from None
            ours = not given.is_dir() or _measured(report.get("model"), Path(bundle))
            (found if ours else other).append((str(file), report))
    return sorted(found, key=lambda r: r[0]), [path for path, _ in other]


def _score_row(path: str, report: dict) -> str:
    s, a = report["summary"], report.get("arguments") or {}
    if report["kind"] == "shapes":
        w = a.get("guidance_scale", a.get("cfg"))  # reports before issue 27 called it cfg
        what = (
            f"`shapes`, {a['generator']} generator" + (f" at w {w:g}" if isinstance(w, (int, float)) else "")
            if a.get("generator")
            else "`shapes`, tokenizer ceiling (true renders, round trip)"
        )
        held = s.get("held_out", {}).get("overall")
        per = ", ".join(f"{c} {v:.2f}" for c, v in s.get("accuracy", {}).items())
        return (
            f"| {what}, {a.get('per_category', '?')} prompts per category, seed {a.get('seed', '?')} | "
            f"{s['overall']:.2f} | {'—' if held is None else f'{held:.2f}'} | {per} | `{path}` |"
        )
    if report["kind"] == "reconstruction":
        t = s["tokenizer"]
        return (
            f"| reconstruction, {s['num_images']} images at {s['image_size']} px | PSNR {t['psnr']:.2f} dB, "
            f"SSIM {t['ssim']:.3f} | — | {s['budget_bytes']:g} bytes per image | `{path}` |"
        )
    return f"| {report['kind']} | see the report | — | — | `{path}` |"


# --- the card -----------------------------------------------------------------------------------------------------
def project_license() -> str:
    """binlat's license (SPDX), from the installed package's metadata, else pyproject.toml's."""
    from importlib import metadata

    try:
        licenses = metadata.metadata("binlat").get_all("License")  # the first, as Message.get gave it
        return (licenses[0] if licenses else None) or PROJECT_LICENSE
    except metadata.PackageNotFoundError:
        return PROJECT_LICENSE


def _scalar(value: str) -> str:
    """A YAML scalar: plain where that is safe, else double-quoted (JSON strings are valid YAML)."""
    plain = value and all(c.isalnum() or c in "-._/:" for c in value) and value[0] not in "-:"
    return value if plain and value.lower() not in ("true", "false", "null", "yes", "no") else json.dumps(value)


def front_matter(fields: Mapping[str, str | list[str]]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {_scalar(v)}" for v in value]
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return "\n".join(lines + ["---"]) + "\n"


def _data_cell(info: dict[str, Any] | None) -> tuple[str, str, str]:
    """(data, steps, size) cells of a part's row in the training table."""
    if info is None:
        return ("unknown (no provenance.json: made before binlat recorded it, or by hand)", "—", "—")
    if info.get("converted_from"):
        return (f"{info.get('data') or 'unknown'} (converted from `{info['converted_from']}`)", "—", "—")
    data = f"`{info['data']}`" if info.get("data") else "unknown"
    if info.get("data_from"):
        data += f" (made from `{info['data_from']}`)"
    if info.get("init_from"):
        data += f"; fine-tuned from `{info['init_from']}`"
    if info.get("notes"):
        data += f"; {info['notes']}"
    steps = f"{info['steps']:,}" if isinstance(info.get("steps"), int) else "—"
    size = f"{info['image_size']} px" if info.get("image_size") else "—"
    return data, steps, size


def _word_list(vocabulary: dict[str, Any]) -> str:
    words = vocabulary["words"]
    shown = ", ".join(words[:CARD_WORDS])
    return shown + (f", … ({len(words)} in all; model_index.json lists them)" if len(words) > CARD_WORDS else "")


def _vocabulary_lines(generators: list[str], parts: Mapping[str, dict | None]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for kind in generators:
        vocabulary = (parts.get(kind) or {}).get("vocabulary")
        key = json.dumps(vocabulary, sort_keys=True) if vocabulary else ""
        groups.setdefault(key, []).append(kind)
    lines = []
    for key, kinds in groups.items():
        who = " and ".join(kinds)
        if not key:
            lines.append(f"- {who}: unknown (open-domain or unrecorded captions): prompts are not checked.")
            continue
        vocabulary = json.loads(key)
        source = "the built-in `shapes` data" if vocabulary["source"] == "shapes" else vocabulary["source"]
        lines.append(f"- {who}: {source}, {len(vocabulary['words'])} words: {_word_list(vocabulary)}.")
    if any(groups):  # some generator knows its words
        lines.append(
            "\n`binlat generate` (and `Pipeline`) warn once when a prompt holds words outside this "
            "vocabulary, naming them: such prompts tend to give a blank or unrelated image."
        )
    return lines


def model_card(
    index: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    parts: Mapping[str, dict[str, Any] | None],
    reports: Sequence[tuple[str, dict]] = (),
) -> str:
    """README.md of a bundle: `index` is its model_index.json, `tokenizer` its tokenizer's config.json, `parts`
    each part's provenance (None: unknown), `reports` (path, report) pairs of evaluations of it."""
    generators = list(index["generators"])
    released = [k for k, info in parts.items() if info and info.get("license")]
    first = parts[released[0]] if released else None  # the first released part's provenance
    terms = dict(first["license"]) if first else None  # the converted weights' license
    fields: dict[str, str | list[str]] = {"license": terms["id"] if terms else project_license().lower()}
    if terms:
        fields |= {"license_name": terms["name"], "license_link": terms["link"]}
    fields |= {
        "library_name": "binlat",
        "pipeline_tag": "text-to-image",
        "tags": ["binlat", "text-to-image", "binary-latent", *generators],
    }
    if first and first.get("converted_from"):
        fields["base_model"] = first["converted_from"]
    k, b, size = tokenizer["num_tokens"], tokenizer["num_bits"], tokenizer["image_size"]
    out = [
        front_matter(fields),
        f"# {index.get('description') or 'binlat text-to-image model'}",
        "",
        f"A binlat bundle: a 1D binary tokenizer ({k} tokens × {b} bits = {k * b // 8:,} bytes per {size} px "
        f"image) and its {' and '.join(generators)} generator{'s' if len(generators) > 1 else ''}, reading text "
        f'through `{index["text_encoder"]}`. Generate with `binlat generate "PROMPT" --model DIR` or '
        f"`Pipeline.from_pretrained(DIR)`, DIR being this folder.",
    ]
    if index.get("trained") is False:
        out.append("\n**Untrained**: randomly initialised weights; its images are noise.")
    sampling = index.get("sampling") or {}
    if sampling:
        tuned = "; ".join(
            f"{kind}: " + ", ".join(f"{s} {v}" for s, v in settings.items()) for kind, settings in sampling.items()
        )
        out.append(f"\nSampling settings it was tuned for (used when a call gives none): {tuned}.")
    out += ["", "## Training data", "", "| part | data | steps | size |", "|---|---|---|---|"]
    out += [f"| {kind} | " + " | ".join(_data_cell(parts.get(kind))) + " |" for kind in [TOKENIZER, *generators]]
    out += ["", "## Vocabulary of its training captions", "", *_vocabulary_lines(generators, parts)]
    out += ["", "## Scores", ""]
    if reports:
        out += ["| measured | overall | held-out | by category | report |", "|---|---|---|---|---|"]
        out += [_score_row(path, report) for path, report in reports]
    else:
        out.append(
            "None measured. Measure with `binlat eval shapes --model DIR --generator GENERATOR --out OUT` "
            "(text to image, for models of the `shapes` domain) or `binlat eval reconstruction --model DIR "
            "--data SPEC --out OUT` (the tokenizer), then write this card again with "
            "`binlat card DIR --eval OUT`."
        )
    out += ["", "## License", ""]
    if terms and first:  # terms come from first
        own = [kind for kind in parts if kind not in released]
        source = first.get("converted_from")
        out.append(
            f"The {' and '.join(released)} weights are converted from `{source}` and keep its license, "
            f"{terms.get('title') or terms['name']} ({terms['link']})."
            + (
                f" The {' and '.join(own)} weights were made with binlat (binlat's license is {project_license()})."
                if own
                else ""
            )
        )
    else:
        out.append(f"Made with binlat; the weights are under binlat's license, {project_license()}.")
    return "\n".join(out) + "\n"


def card_files(
    index: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    parts: Mapping[str, dict[str, Any] | None],
    reports: Sequence[tuple[str, dict]] = (),
) -> dict[str, bytes]:
    """The files a bundle's card adds: README.md and each known part's provenance.json (path in the bundle ->
    bytes)."""
    files = {CARD: model_card(index, tokenizer, parts, reports).encode("utf-8")}
    files |= {f"{kind}/{PROVENANCE}": provenance_file(info)[PROVENANCE] for kind, info in parts.items() if info}
    return files


def write_card(bundle: str | Path, reports: Sequence[tuple[str, dict]] = ()) -> Path:
    """Write an existing bundle's README.md again, and its model_index.json "vocabulary", from the provenance of its
    parts and `reports` ((path, report) pairs: find_reports) (`binlat card`). Returns the card's path."""
    from .config import config_from_dict, config_to_dict
    from .io import atomic_write_bytes, read_bounded

    bundle = Path(bundle)
    if not (bundle / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{bundle}: no {INDEX_NAME}; not a binlat bundle (binlat bundle makes one)")
    index = json.loads(read_bounded(bundle / INDEX_NAME, what="bundle index").decode("utf-8"))
    tokenizer = json.loads(read_bounded(bundle / TOKENIZER / "config.json", what="tokenizer config").decode("utf-8"))
    parts = {kind: read_provenance(bundle / kind) for kind in [TOKENIZER, *index.get("generators", [])]}
    index["vocabulary"] = bundle_vocabulary(parts)
    config = config_from_dict(PipelineConfig, index, str(bundle / INDEX_NAME))  # checked as loading checks it
    write_index(bundle, config)
    atomic_write_bytes(bundle / CARD, model_card(config_to_dict(config), tokenizer, parts, reports).encode("utf-8"))
    return bundle / CARD
