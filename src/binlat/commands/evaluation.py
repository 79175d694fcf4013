"""Commands that measure: eval (reconstruction, shapes, clip-score, fid) and bench."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_FAILED, sampling_given


def cmd_bench(args: argparse.Namespace) -> int:
    """Speed, efficiency and memory comparisons on random networks (see binlat.bench)."""
    from ..bench import run_bench

    result = run_bench(preset=args.preset, quick=args.quick, tiny=args.tiny, json_path=args.json)
    if args.json:
        print(f"wrote {args.json}")
    return EXIT_FAILED if result["meta"]["failed"] else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`binlat eval KIND`: each evaluation writes a JSON report and prints its table(s) (binlat.eval.report)."""
    from ..eval.report import print_tables

    kind, out = args.eval_kind, args.out
    if kind == "reconstruction":
        from ..eval.reconstruction import run_reconstruction

        report = run_reconstruction(
            args.model,
            args.data,
            num_images=args.num_images,
            size=args.size,
            batch_size=args.batch_size,
            lpips_weights=args.lpips_weights,
            out=out,
            json_path=args.json,
            device=args.device,
            progress=not args.no_progress,
            allow_data_commands=args.allow_data_commands,
        )
        if not report["summary"]["lpips"]["available"]:
            print(f"note: LPIPS not available: {report['summary']['lpips']['reason']}", file=sys.stderr)
    elif kind == "shapes":
        from ..eval.shapes_eval import run_shapes

        report = run_shapes(
            args.model,
            kind=args.generator,
            per_category=args.per_category,
            sampling=sampling_given(args),
            seed=args.seed,
            batch_size=args.batch_size,
            out=out,
            json_path=args.json,
            ground_truth=args.ground_truth,
            no_tokenizer=args.no_tokenizer,
            size=args.size,
            held_out=not args.no_held_out,
            text_encoder=args.text_encoder,
            device=args.device,
            progress=not args.no_progress,
        )
    elif kind == "clip-score":
        from ..eval.features import run_clip_score

        report = run_clip_score(
            args.images,
            args.prompts,
            args.clip_model,
            batch_size=args.batch_size,
            out=out,
            json_path=args.json,
            device=args.device,
        )
    else:
        from ..eval.features import run_fid

        report = run_fid(
            args.real,
            args.fake,
            args.inception_weights,
            batch_size=args.batch_size,
            out=out,
            json_path=args.json,
            device=args.device,
        )
    print_tables(report["tables"])
    extra = [report["summary"].get(k) for k in ("examples_sheet", "failures_sheet")]
    print(f"wrote {report['path']}" + "".join(f" and {p}" for p in extra if p))
    return 0
