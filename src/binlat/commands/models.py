"""Commands that make or check model directories: convert-official, conformance and bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import EXIT_FAILED, CLIError, storage_dtype


def cmd_convert_official(args: argparse.Namespace) -> int:
    single = {"--kind": args.kind, "--config": args.config, "--weights": args.weights, "--scale": args.scale}
    if args.release:
        from ..release import convert_release

        if extra := [o for o, v in single.items() if v is not None]:
            raise CLIError(f"--release converts the whole download; drop {', '.join(extra)}")
        out = convert_release(
            args.release,
            args.out,
            args.release_config,
            dtype=storage_dtype(args.dtype),
            allow_nonfinite=args.allow_nonfinite_weights,
        )
        print(f"wrote pipeline bundle to {out} (binlat generate PROMPT --model {out})")
        return 0
    if missing := [o for o in ("--kind", "--config", "--weights") if single[o] is None]:
        raise CLIError(f"give --release DIR, or --kind, --config and --weights (missing {', '.join(missing)})")
    if args.release_config:
        raise CLIError("--release-config goes with --release DIR")
    from ..official import convert_official

    # Not given: the config decides (official.RELEASE_SCALE when it has no "scale" key).
    scale = {} if args.scale is None else {"scale": None if args.scale == "none" else args.scale}
    out = convert_official(
        args.kind,
        args.config,
        args.weights,
        args.out,
        **scale,
        dtype=storage_dtype(args.dtype),
        allow_nonfinite=args.allow_nonfinite_weights,
    )
    print(f"wrote {args.kind} model to {out} (load with from_pretrained)")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from ..conformance import run_case

    failed = 0
    cases = []
    for path in map(Path, args.cases):
        # A folder of cases runs every case inside it.
        inner = sorted(d for d in path.iterdir() if (d / "config.json").is_file()) if path.is_dir() else []
        cases += inner if inner and not (path / "config.json").is_file() else [path]
    for case in cases:
        for c in run_case(case):
            status = "ok" if c.ok else "FAIL"
            tol = "exact" if c.tolerance == 0 else f"tol {c.tolerance:g}"
            print(f"{Path(case).name:16s} {c.name:16s} max abs err {c.max_abs_error:.3e}  ({tol})  {status}")
            failed += not c.ok
    print("all outputs within tolerance" if not failed else f"{failed} output(s) out of tolerance")
    return 0 if not failed else EXIT_FAILED


def _provenance(name: str):
    """The provenance.json of a model directory given by path or as the shipped model's part ("default/..."), or None
    (a Hub id, a directory without one)."""
    from ..card import read_provenance
    from ..modeling import named_model_dir

    try:
        return read_provenance(named_model_dir(name) or Path(name))
    except FileNotFoundError:
        return None


def _reports(paths, bundle) -> list:
    """The reports among --eval PATH... that describe `bundle` (binlat.card.find_reports), saying which it skipped."""
    from ..card import find_reports

    reports, other = find_reports(paths or [], bundle)
    if other:
        print(
            f"note: left {len(other)} report(s) of other models off the card: {', '.join(other[:3])}"
            + (", …" if len(other) > 3 else ""),
            file=sys.stderr,
        )
    return reports


def cmd_card(args: argparse.Namespace) -> int:
    """Write a bundle's model card (README.md) and its vocabulary again from its parts' provenance and reports."""
    from ..card import write_card

    reports = _reports(args.eval, args.bundle)
    path = write_card(args.bundle, reports)
    print(f"wrote {path} ({len(reports)} report(s) on it)")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """A pipeline directory from a tokenizer and one model directory per generator (--<kind> DIR), with its model
    card (README.md: binlat.card) from the parts' provenance.json and the --eval reports."""
    from ..card import bundle_vocabulary, card_files
    from ..config import config_to_dict
    from ..pipeline import Pipeline, PipelineConfig
    from ..registry import generator, generator_kinds
    from ..text import TextEncoder
    from ..tokenizer import BinaryTokenizer

    given = {k: getattr(args, k) for k in generator_kinds() if getattr(args, k, None)}
    if not given:
        raise CLIError(f"give {' and/or '.join(f'--{k} DIR' for k in generator_kinds())}")
    try:  # checked before any model is loaded
        sampling = json.loads(args.sampling) if args.sampling else {}
    except json.JSONDecodeError as e:
        raise CLIError(
            f'--sampling: not valid JSON ({e.msg}); e.g. \'{{"diffusion": {{"guidance_scale": 3}}}}\''
        ) from None
    if not isinstance(sampling, dict):
        raise CLIError(
            f"--sampling: expected a JSON object of generator kinds, e.g. "
            f'\'{{"diffusion": {{"guidance_scale": 3}}}}\', got {type(sampling).__name__} {args.sampling}'
        )
    reports = _reports(args.eval, args.out)
    tokenizer = BinaryTokenizer.from_pretrained(args.tokenizer)
    parts = {k: generator(k).network.from_pretrained(path) for k, path in given.items()}
    encoder = TextEncoder(args.text_encoder)
    origin = {"tokenizer": _provenance(args.tokenizer)} | {k: _provenance(path) for k, path in given.items()}
    try:
        config = PipelineConfig(
            text_encoder=args.text_encoder,
            generators=tuple(parts),
            image_size=tokenizer.config.image_size,
            description=args.description,
            sampling=sampling,
        )
    except (ValueError, TypeError) as e:
        raise CLIError(f"--sampling: {e}") from None
    config.vocabulary = bundle_vocabulary(origin)
    files = card_files(config_to_dict(config), config_to_dict(tokenizer.config), origin, reports)
    Pipeline(tokenizer, encoder, config=config, **parts).save_pretrained(
        args.out, dtype=storage_dtype(args.dtype), files=files
    )
    unknown = [k for k, info in origin.items() if info is None]
    print(
        f"wrote pipeline bundle to {args.out} with its model card (README.md"
        + (f"; training data unknown for {', '.join(unknown)}: no provenance.json" if unknown else "")
        + ")"
    )
    return 0
