"""Commands around training: train, probe, precompute, params and export."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .common import EXIT_FAILED, CLIError, storage_dtype


def _train_config(args: argparse.Namespace):
    """The --config file with the --set overrides, which must be a config of the command's kind."""
    from ..config import load_config
    from ..train.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.set or [], kind=args.kind)
    if cfg.kind != args.kind:
        raise CLIError(f"{args.config} is a {cfg.kind} config, not {args.kind}")
    return cfg


def fit_to_max_steps(cfg, given: set[str]):
    """A --max-steps run shorter than the preset's warm-up, log or sample interval would end still warming up,
    log nothing and sample nothing: those intervals shrink to fit (a tenth of the run; samples at its end), and a
    note says so. An interval given with --set is the user's and stays."""
    n = cfg.max_steps
    fitted = {
        "warmup_steps": max(1, n // 10) if cfg.warmup_steps >= n else None,
        "log_every": max(1, n // 10) if cfg.log_every > n else None,
        "sample_every": n if cfg.sample_every > n else None,
    }
    fitted = {k: v for k, v in fitted.items() if v is not None and k not in given}
    if fitted:
        told = ", ".join(f"{k} {getattr(cfg, k)} -> {v}" for k, v in fitted.items())
        print(
            f"note: --max-steps {n} is shorter than the preset's intervals: {told} (--set KEY=VALUE keeps yours)",
            file=sys.stderr,
        )
        cfg = dataclasses.replace(cfg, **fitted)
    return cfg


def same_model(a: str, b: str) -> bool:
    """Whether two model references name one directory (paths compared resolved)."""
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def tokenizer_of_precomputed(cfg, chosen: bool):
    """Generator training on a precomputed folder takes the tokenizer its bits were made with (recorded in its
    index), unless generator.tokenizer was set on the command line; then a mismatch names both fixes."""
    import json

    from ..data.precomputed import INDEX

    index = Path(cfg.data.removeprefix("precomputed:")) / INDEX
    if not index.is_file():
        return cfg
    try:
        made_with = str(json.loads(index.read_text(encoding="utf-8")).get("tokenizer") or "")
    except (OSError, ValueError, AttributeError):
        return cfg  # a damaged index is the dataset's to report
    if not made_with or same_model(made_with, cfg.generator.tokenizer):
        return cfg
    if chosen:
        raise CLIError(
            f"{index.parent} holds bits of tokenizer {made_with}, but --set generator.tokenizer names "
            f"{cfg.generator.tokenizer}: drop that --set to train on the bits' own tokenizer, or precompute "
            f"again with --tokenizer {cfg.generator.tokenizer}"
        )
    print(
        f"note: generator.tokenizer is {made_with}, the tokenizer {index.parent}'s bits were made with "
        f"(the preset named {cfg.generator.tokenizer})",
        file=sys.stderr,
    )
    return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, tokenizer=made_with))


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.engine import NonFiniteLossError, Trainer

    cfg = _train_config(args)
    given = {"data": args.data, "max_steps": args.max_steps, "batch_size": args.batch_size}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})  # checked again
    if args.unconditional:
        cfg = dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, unconditional=True))
    given_keys = {entry.partition("=")[0].strip() for entry in args.set or []}
    if args.max_steps is not None:
        cfg = fit_to_max_steps(cfg, given_keys)
    if cfg.kind != "tokenizer":
        cfg = tokenizer_of_precomputed(cfg, "generator.tokenizer" in given_keys)
    if args.allow_data_commands and args.data is None:
        raise CLIError(
            "--allow-data-commands applies to a --data typed on the command line, and none was given; "
            'a config file\'s "data" never runs a program: pass the URL with --data'
        )
    out = Path(args.output or f"runs/{args.kind}")
    trainer = Trainer(cfg, out, resume=args.resume, allow_data_commands=args.allow_data_commands)
    try:
        last = trainer.train()
    except NonFiniteLossError as e:  # an expected way for a run to end: one line, exit 1
        print(f"binlat: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        trainer.end_distributed()  # the process ends here; a library caller's group stays up
    if trainer.acc.is_main_process:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "bit_accuracy", "psnr"))
        shown = f" ({shown})" if shown else " (already finished; nothing to train)"  # a resumed, finished run
        print(f"finished {args.kind} training at step {trainer.step}{shown}; run folder {out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from ..probe import run_probe

    cfg = _train_config(args)
    changes = {"max_steps": args.steps, "trackers": [], "save_every": min(cfg.save_every, args.steps)}
    if args.sample_every is not None:
        changes["sample_every"] = args.sample_every
    cfg = dataclasses.replace(cfg, **changes)  # --threads is applied by cli.main, as for every command
    change = args.change or (" ".join(args.set) if args.set else "baseline")
    row = run_probe(cfg, change, args.out, per_category=args.per_category)
    print(" | ".join(f"{k} {v}" for k, v in row.items()))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Every key of a training preset (or config file) after the --set overrides: value, type, default, help."""
    from ..config import load_config
    from ..config_help import describe
    from ..train.config import TrainConfig

    cfg = load_config(TrainConfig, args.preset, args.set or [])
    model = cfg.model_config()  # the model keys at their class defaults where the preset leaves them out
    rows = describe(cfg, extra={"model": model})
    print(
        f"# {args.preset}: every key, its value here, [type; default] and help. --set KEY=VALUE takes these keys. "
        f"model keys that the tokenizer and text encoder fix (num_bits, num_tokens, text_dim, text_layers) show "
        f"their class defaults: a run takes them from its tokenizer and text encoder."
    )
    width = max(len(r[0]) + len(r[1]) for r in rows) + 3
    for key, value, kind, default, text in rows:
        print(f"{key} = {value}".ljust(width) + f"  [{kind}; default {default}]" + (f"  {text}" if text else ""))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """Parameter counts of training presets, built on the meta device (no memory, no weights), with the token grid
    and architecture each builds (binlat.train.presets)."""
    from ..train.presets import preset_facts

    for path in args.configs:
        f = preset_facts(path)
        grid = f"{f.grid} bits" + ("" if f.grid_from == "the preset" else f" (from {f.grid_from})")
        print(f"{path}: {f.kind}, {f.millions} parameters, {grid}, {f.image_size} px, {f.architecture}")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from ..data.precomputed import precompute
    from ..data.readers import make_dataset
    from ..text import TextEncoder, text_layer_map
    from ..tokenizer import BinaryTokenizer

    tokenizer = BinaryTokenizer.from_pretrained(args.tokenizer)
    size = args.size or tokenizer.config.image_size
    data = make_dataset(
        args.data, size=size, seed=args.seed, random_crop=False, allow_commands=args.allow_data_commands
    )
    encoder, layers = None, None
    if args.text_layers or args.generator_layers:
        encoder = TextEncoder(args.text_encoder, max_length=args.text_max_length)
        layers = (
            [int(x) for x in args.text_layers.split(",")]
            if args.text_layers
            else text_layer_map(encoder.num_layers, args.generator_layers)
        )
    n = precompute(
        data,
        tokenizer,
        args.out,
        text_encoder=encoder,
        text_layers=layers,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        tokenizer_ref=model_ref(args.tokenizer),
        data_spec=args.data,
        progress=not args.no_progress,
    )
    print(f"wrote {n} samples to {args.out}" + (f" with text layers {layers}" if layers else " (bits + captions)"))
    return 0


def model_ref(name: str) -> str:
    """How an index records a model: a local directory as its absolute path (so a run from another folder finds
    it), a name ("default/tokenizer", a Hub id) as given."""
    path = Path(name)
    return str(path.resolve()) if path.is_dir() and not str(name).startswith("default") else str(name)


def cmd_export(args: argparse.Namespace) -> int:
    from ..train.checkpoints import export_run

    out = export_run(args.run, args.out, args.checkpoint, dtype=storage_dtype(args.dtype))
    print(f"wrote EMA weights to {out}")
    return 0
