"""The `binlat` command: a thin layer that parses arguments, calls the public API and prints results.

Every expected failure (bad argument, unreadable file, mismatched weights) ends with a one-line message and a
non-zero exit code; a traceback is shown only with --debug."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

EXIT_USAGE, EXIT_FAILED = 2, 1


class CLIError(Exception):
    """A user-facing error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def _number(name: str, low: float, inclusive: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, "
                                             f"got {text}")
        return value
    return parse


def _protocol(text: str) -> int:
    if text.strip() not in ("1", "2"):
        raise argparse.ArgumentTypeError(f"protocol must be 1 or 2, got {text!r}")
    return int(text)


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be N or HxW in pixels (e.g. 64 or 64x96), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            raw = Path(args.prompts_file).read_bytes()
        except OSError as e:
            raise CLIError(f"cannot read prompts file {args.prompts_file}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"prompts file {args.prompts_file} is not valid UTF-8 (byte {e.start})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CLIError("no prompts: give PROMPT arguments or --prompts FILE with one prompt per line")
    return prompts


def _load_pipeline(model: str | None, text_encoder: str | None):
    from .pipeline import Pipeline, default_model_dir
    path = model or default_model_dir()
    if path is None:
        print("note: no trained model is installed yet; using a randomly initialised tiny model, so the images "
              "are noise (pass --model DIR for a trained bundle)", file=sys.stderr)
        from .text import TextEncoder
        return Pipeline.random_tiny(text_encoder=TextEncoder(text_encoder) if text_encoder else None)
    if not Path(path).is_dir() and str(path).count("/") != 1:  # "org/name" may be a Hub id
        raise CLIError(f"model directory {path} does not exist (pass --model DIR with a binlat bundle)")
    return Pipeline.from_pretrained(path, text_encoder=text_encoder)


def _next_index(out: Path) -> int:
    taken = [int(m.group(1)) for f in out.glob("*.png") if (m := re.fullmatch(r"(\d{5,})\.png", f.name))]
    return max(taken, default=-1) + 1


def cmd_generate(args: argparse.Namespace) -> int:
    from .io import atomic_write_bytes
    if args.dtype == "bfloat16":  # refused before anything is loaded or created where it would be emulated
        from .hardware import require_bf16
        require_bf16("cpu", "bfloat16 generation", fix="use --dtype float32")
    prompts = _read_prompts(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"cannot write to output directory {out}: {e.strerror}") from None
    pipe = _load_pipeline(args.model, args.text_encoder)
    _resolve_sampling(pipe, args.generator, args)
    if args.dtype != "float32":
        import torch
        pipe.to(dtype=getattr(torch, args.dtype))
    if args.compile:
        pipe.compile()
    height, width = args.size if args.size else (None, None)
    result = pipe(prompts, generator=args.generator, num_steps=args.steps, guidance_scale=args.cfg,
                  temperature=args.temperature, rho=args.rho, protocol=args.protocol, seed=args.seed,
                  height=height, width=width, batch_size=args.batch_size, progress=not args.no_progress)
    first = _next_index(out)
    records = []
    for i, (image, prompt, seed) in enumerate(zip(result.images, result.prompts, result.seeds)):
        # File names come from a counter, never from prompt text: nothing can escape --out or collide.
        name = f"{first + i:05d}.png"
        atomic_write_bytes(out / name, _png_bytes(image))
        records.append({"file": name, "prompt": prompt, "seed": seed, "generator": args.generator,
                        "steps": args.steps if args.generator == "diffusion" else None, "cfg": args.cfg,
                        "temperature": args.temperature, "rho": args.rho, "protocol": args.protocol,
                        "height": image.height, "width": image.width, "dtype": args.dtype,
                        "model": str(args.model or "default"), "trained": pipe.config.trained})
    with open(out / "metadata.jsonl", "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if args.grid:
        from .grid import contact_sheet
        name = f"grid-{first:05d}.png"
        atomic_write_bytes(out / name, _png_bytes(contact_sheet(result.images, result.prompts, result.seeds)))
        print(f"wrote {out / name}")
    print(f"wrote {len(records)} image(s) to {out} ({records[0]['file']} .. {records[-1]['file']}), "
          f"metadata in {out / 'metadata.jsonl'}")
    return 0


def _png_bytes(image) -> bytes:
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _reference_scale(text: str) -> int | str:
    """--scale: a reference size in pixels, or "none" (no position scaling)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return _positive_int("scale")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"scale must be a positive integer (pixels) or none, got {text!r}") from None


def cmd_convert_official(args: argparse.Namespace) -> int:
    single = {"--kind": args.kind, "--config": args.config, "--weights": args.weights, "--scale": args.scale}
    if args.release:
        from .release import convert_release
        if extra := [o for o, v in single.items() if v is not None]:
            raise CLIError(f"--release converts the whole download; drop {', '.join(extra)}")
        out = convert_release(args.release, args.out, args.release_config, dtype=storage_dtype(args.dtype))
        print(f"wrote pipeline bundle to {out} (binlat generate PROMPT --model {out})")
        return 0
    if missing := [o for o in ("--kind", "--config", "--weights") if single[o] is None]:
        raise CLIError(f"give --release DIR, or --kind, --config and --weights (missing {', '.join(missing)})")
    if args.release_config:
        raise CLIError("--release-config goes with --release DIR")
    from .official import convert_official
    # Not given: the config decides (official.RELEASE_SCALE when it has no "scale" key).
    scale = {} if args.scale is None else {"scale": None if args.scale == "none" else args.scale}
    out = convert_official(args.kind, args.config, args.weights, args.out, **scale, dtype=storage_dtype(args.dtype))
    print(f"wrote {args.kind} model to {out} (load with from_pretrained)")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import run_case
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


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.config import TrainConfig
    from .train.engine import NonFiniteLossError, Trainer
    cfg = load_config(TrainConfig, args.config, args.set or [])
    if cfg.kind != args.kind:
        raise CLIError(f"{args.config} is a {cfg.kind} config, not {args.kind}")
    given = {"data": args.data, "max_steps": args.max_steps, "batch_size": args.batch_size}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})  # checked again
    out = Path(args.output or f"runs/{args.kind}")
    trainer = Trainer(cfg, out, resume=args.resume)
    try:
        last = trainer.train()
    except NonFiniteLossError as e:  # an expected way for a run to end: one line, exit 1
        print(f"binlat: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if trainer.acc.is_main_process:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "bit_accuracy", "psnr"))
        print(f"finished {args.kind} training at step {trainer.step} ({shown}); run folder {out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import torch
    from .config import load_config
    from .train.config import TrainConfig
    from .train.probe import run_probe
    cfg = load_config(TrainConfig, args.config, args.set or [])
    if cfg.kind != args.kind:
        raise CLIError(f"{args.config} is a {cfg.kind} config, not {args.kind}")
    changes = {"max_steps": args.steps, "trackers": [], "save_every": min(cfg.save_every, args.steps)}
    if args.sample_every is not None:
        changes["sample_every"] = args.sample_every
    cfg = dataclasses.replace(cfg, **changes)
    if args.threads:
        torch.set_num_threads(args.threads)
    change = args.change or (" ".join(args.set) if args.set else "baseline")
    row = run_probe(cfg, change, args.out, per_category=args.per_category)
    print(" | ".join(f"{k} {v}" for k, v in row.items()))
    return 0


STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def storage_dtype(name: str):
    """None keeps the weights' own float32; otherwise the torch dtype to store them in."""
    import torch
    return None if name == "float32" else getattr(torch, name)


def cmd_export(args: argparse.Namespace) -> int:
    from .train.checkpoints import export_run
    out = export_run(args.run, args.out, args.checkpoint, dtype=storage_dtype(args.dtype))
    print(f"wrote EMA weights to {out}")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from .generators import ARTransformer, DiffusionTransformer
    from .pipeline import Pipeline, PipelineConfig
    from .text import TextEncoder
    from .tokenizer import BinaryTokenizer
    if not (args.diffusion or args.ar):
        raise CLIError("give --diffusion DIR and/or --ar DIR")
    try:  # checked before any model is loaded
        sampling = json.loads(args.sampling) if args.sampling else {}
    except json.JSONDecodeError as e:
        raise CLIError(f"--sampling: not valid JSON ({e.msg}); "
                       f"e.g. '{{\"diffusion\": {{\"guidance_scale\": 3}}}}'") from None
    tokenizer = BinaryTokenizer.from_pretrained(args.tokenizer)
    parts = {k: cls.from_pretrained(p) for k, cls, p in (("diffusion", DiffusionTransformer, args.diffusion),
                                                          ("ar", ARTransformer, args.ar)) if p}
    encoder = TextEncoder(args.text_encoder)
    try:
        config = PipelineConfig(text_encoder=args.text_encoder, generators=tuple(parts),
                                image_size=tokenizer.config.image_size, description=args.description,
                                sampling=sampling)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--sampling: {e}") from None
    Pipeline(tokenizer, encoder, config=config, **parts).save_pretrained(args.out, dtype=storage_dtype(args.dtype))
    print(f"wrote pipeline bundle to {args.out}")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from .data.precomputed import precompute
    from .data.readers import make_dataset
    from .text import TextEncoder, text_layer_map
    from .tokenizer import BinaryTokenizer
    tokenizer = BinaryTokenizer.from_pretrained(args.tokenizer)
    size = args.size or tokenizer.config.image_size
    data = make_dataset(args.data, size=size, seed=args.seed, random_crop=False)
    encoder, layers = None, None
    if args.text_layers or args.generator_layers:
        encoder = TextEncoder(args.text_encoder, max_length=args.text_max_length)
        layers = ([int(x) for x in args.text_layers.split(",")] if args.text_layers
                  else text_layer_map(encoder.num_layers, args.generator_layers))
    n = precompute(data, tokenizer, args.out, text_encoder=encoder, text_layers=layers, shard_size=args.shard_size,
                   batch_size=args.batch_size, max_samples=args.max_samples, tokenizer_ref=str(args.tokenizer),
                   progress=not args.no_progress)
    print(f"wrote {n} samples to {args.out}" + (f" with text layers {layers}" if layers else " (bits + captions)"))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """Parameter counts of training presets, built on the meta device (no memory, no weights)."""
    import torch

    from .config import load_config
    from .train.config import TrainConfig
    from .train.tasks import model_for_export
    for path in args.configs:
        cfg = load_config(TrainConfig, path)
        model = dict(cfg.model)
        if cfg.kind == "tokenizer":
            model.setdefault("image_size", cfg.image_size)
        with torch.device("meta"):
            n = sum(p.numel() for p in model_for_export(cfg.kind, model).parameters())
        print(f"{path}: {cfg.kind}, {n / 1e6:.1f} M parameters")
    return 0


def _unit_interval(name: str):
    def parse(text: str) -> float:
        value = _number(name, 0.0)(text)
        if value > 1:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {text}")
        return value
    return parse


def _at_least(name: str, low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        return value
    return parse


def _output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"cannot write to output directory {out}: {e.strerror}") from None
    return out


def _input_image(path: str):
    """The image at `path`; a missing file is an OSError (exit 1), a file that is no image a ValueError (exit 2),
    each one line naming the file."""
    from .editing import open_image
    return open_image(path)


def _write_results(out: Path, images, records: list[dict]) -> list[str]:
    """Write images under counter names (never from prompt text) and append their metadata lines."""
    from .io import atomic_write_bytes
    first = _next_index(out)
    names = [f"{first + i:05d}.png" for i in range(len(records))]
    for name, image in zip(names, images):
        atomic_write_bytes(out / name, _png_bytes(image))
    with open(out / "metadata.jsonl", "a", encoding="utf-8") as f:
        for name, record in zip(names, records):
            f.write(json.dumps({"file": name, **record}, ensure_ascii=False) + "\n")
    return names


SAMPLING_OPTIONS = {  # option -> (Pipeline setting, argparse type, help)
    "steps": ("num_steps", _positive_int("steps"), "diffusion steps"),
    "cfg": ("guidance_scale", _number("guidance scale", 0.0), "guidance scale w"),
    "temperature": ("temperature", _number("temperature", 0.0), "sampling temperature; 0 thresholds"),
    "rho": ("rho", _number("rho", 0.0, inclusive=False), "time-step spacing exponent"),
    "protocol": ("protocol", _protocol, "diffusion step protocol, 1 or 2"),
}


def _add_sampling_options(parser: argparse.ArgumentParser, names=tuple(SAMPLING_OPTIONS)) -> None:
    """Sampling options default to None: the model bundle's tuned settings apply, else the built-in ones."""
    from .pipeline import BUILTIN_SAMPLING
    for name in names:
        setting, kind, text = SAMPLING_OPTIONS[name]
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help=f"{text} (default: the model's setting, else {BUILTIN_SAMPLING[setting]})")


def _resolve_sampling(pipe, generator: str, args: argparse.Namespace) -> None:
    """Fill the sampling options the user left out with the pipeline's settings (recorded in metadata as used)."""
    given = {SAMPLING_OPTIONS[n][0]: getattr(args, n) for n in SAMPLING_OPTIONS if hasattr(args, n)}
    settings = pipe.sampling_settings(generator, **given)
    for name in SAMPLING_OPTIONS:
        if hasattr(args, name):
            setattr(args, name, settings[SAMPLING_OPTIONS[name][0]])


def cmd_edit(args: argparse.Namespace) -> int:
    from .editing import edit
    out = _output_dir(args.out)
    image = _input_image(args.image)
    pipe = _load_pipeline(args.model, args.text_encoder)
    _resolve_sampling(pipe, "diffusion", args)
    height, width = args.size if args.size else (None, None)
    result = edit(pipe, image, args.prompt, strength=args.strength, num_steps=args.steps, guidance_scale=args.cfg,
                  temperature=args.temperature, rho=args.rho, protocol=args.protocol, seed=args.seed,
                  height=height, width=width, progress=not args.no_progress)
    records = _records(result, pipe, args, kind="edit", source=str(args.image), strength=args.strength,
                       generator="diffusion", steps=args.steps, cfg=args.cfg, temperature=args.temperature,
                       rho=args.rho, protocol=args.protocol)
    names = _write_results(out, result.images, records)
    print(f"wrote {out / names[0]} (edit of {args.image} at strength {args.strength:g}, seed {result.seeds[0]}), "
          f"metadata in {out / 'metadata.jsonl'}")
    return 0


def _records(result, pipe, args: argparse.Namespace, **fields) -> list[dict]:
    """metadata.jsonl lines for an edit-style result: the given fields plus each image's prompt, seed and size."""
    return [{**fields, "prompt": prompt, "seed": seed, "height": im.height, "width": im.width,
             "model": str(args.model or "default"), "trained": pipe.config.trained}
            for im, prompt, seed in zip(result.images, result.prompts, result.seeds)]


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .editing import interpolate, strip
    from .io import atomic_write_bytes
    out = _output_dir(args.out)
    image_a, image_b = _input_image(args.image_a), _input_image(args.image_b)
    pipe = _load_pipeline(args.model, args.text_encoder)
    height, width = args.size if args.size else (None, None)
    frames = interpolate(pipe, image_a, image_b, steps=args.steps, seed=args.seed, height=height, width=width)
    records = [{"kind": "interpolate", "a": str(args.image_a), "b": str(args.image_b), "frame": k,
                "fraction": k / (args.steps - 1), "seed": args.seed, "height": im.height, "width": im.width,
                "model": str(args.model or "default"), "trained": pipe.config.trained}
               for k, im in enumerate(frames)]
    names = _write_results(out, frames, records)
    strip_name = f"strip-{names[0][:-4]}.png"
    atomic_write_bytes(out / strip_name, _png_bytes(strip(frames)))
    print(f"wrote {out / strip_name} and {len(names)} frames ({names[0]} .. {names[-1]}), "
          f"metadata in {out / 'metadata.jsonl'}")
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    from .editing import continue_ar
    out = _output_dir(args.out)
    image = _input_image(args.image)
    pipe = _load_pipeline(args.model, args.text_encoder)
    _resolve_sampling(pipe, "ar", args)
    height, width = args.size if args.size else (None, None)
    result = continue_ar(pipe, image, args.prompt, args.keep_tokens, guidance_scale=args.cfg,
                         temperature=args.temperature, seed=args.seed, height=height, width=width,
                         progress=not args.no_progress)
    records = _records(result, pipe, args, kind="continue", source=str(args.image), keep_tokens=args.keep_tokens,
                       generator="ar", cfg=args.cfg, temperature=args.temperature)
    names = _write_results(out, result.images, records)
    print(f"wrote {out / names[0]} (first {args.keep_tokens} tokens of {args.image} kept, seed {result.seeds[0]}), "
          f"metadata in {out / 'metadata.jsonl'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeLimits, bind_socket, create_app, serve
    limits = ServeLimits(max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                         max_body_bytes=args.max_body_bytes, max_n=args.max_n, max_steps=args.max_steps,
                         max_prompt_chars=args.max_prompt_chars, max_size=args.max_size)
    sock = bind_socket(args.host, args.port)  # before the model loads: a busy port fails at once
    try:
        pipe = _load_pipeline(args.model, args.text_encoder)
        serve(create_app(pipe, limits), args.host, args.port, log_level=args.log_level, sock=sock)
    except KeyboardInterrupt:  # uvicorn has shut down gracefully and passes Ctrl+C on
        print("binlat: server stopped", file=sys.stderr)
    finally:
        sock.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Speed, efficiency and memory comparisons on random networks (see binlat.eval.bench)."""
    from .eval.bench import run_bench
    result = run_bench(preset=args.preset, quick=args.quick, tiny=args.tiny, json_path=args.json)
    if args.json:
        print(f"wrote {args.json}")
    return EXIT_FAILED if result["meta"]["failed"] else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`binlat eval KIND`: each evaluation writes a JSON report and prints its table(s) (binlat.eval.report)."""
    from .eval.report import print_tables
    kind, out = args.eval_kind, args.out
    if kind == "reconstruction":
        from .eval.reconstruction import run_reconstruction
        report = run_reconstruction(args.model, args.data, num_images=args.num_images, size=args.size,
                                    batch_size=args.batch_size, lpips_weights=args.lpips_weights, out=out,
                                    json_path=args.json, device=args.device, progress=not args.no_progress)
        if not report["summary"]["lpips"]["available"]:
            print(f"note: LPIPS not available: {report['summary']['lpips']['reason']}", file=sys.stderr)
    elif kind == "shapes":
        from .eval.shapes_eval import run_shapes
        report = run_shapes(args.model, generator=args.generator, per_category=args.per_category, steps=args.steps,
                            cfg=args.cfg, temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                            out=out, json_path=args.json, ground_truth=args.ground_truth,
                            no_tokenizer=args.no_tokenizer, size=args.size, held_out=not args.no_held_out,
                            text_encoder=args.text_encoder, device=args.device, progress=not args.no_progress)
    elif kind == "clip-score":
        from .eval.features import run_clip_score
        report = run_clip_score(args.images, args.prompts, args.clip_model, batch_size=args.batch_size, out=out,
                                json_path=args.json, device=args.device)
    else:
        from .eval.features import run_fid
        report = run_fid(args.real, args.fake, args.inception_weights, batch_size=args.batch_size, out=out,
                         json_path=args.json, device=args.device)
    print_tables(report["tables"])
    extra = [report["summary"].get(k) for k in ("examples_sheet", "failures_sheet")]
    print(f"wrote {report['path']}" + "".join(f" and {p}" for p in extra if p))
    return 0


def _add_image_job_options(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """Options shared by the commands that load a pipeline and write images (edit, interpolate, continue)."""
    p.add_argument("--size", type=_size, default=None, metavar="N|HxW", help="work size (default: the model's)")
    p.add_argument("--model", metavar="DIR", help="pipeline bundle directory (default: the shipped model)")
    p.add_argument("--text-encoder", metavar="NAME_OR_PATH", help="override the bundle's text encoder")
    p.add_argument("--out", default="out", metavar="DIR", help="output directory (default ./out)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="binlat", description="Text-to-image generation in a 1D binary latent space.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from prompts")
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    g.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="file with one prompt per line")
    g.add_argument("--model", metavar="DIR", help="pipeline bundle, or the Instella-T2I release (its download "
                   "folder, or amd/Instella-T2I once in the Hugging Face cache) (default: the shipped model)")
    g.add_argument("--text-encoder", metavar="NAME_OR_PATH",
                   help="override the bundle's text encoder (e.g. amd/AMD-OLMo-1B or a local path)")
    g.add_argument("--generator", choices=["diffusion", "ar"], default="diffusion")
    _add_sampling_options(g)
    g.add_argument("--seed", type=int, default=None, help="base seed; image i uses seed + i")
    g.add_argument("--size", type=_size, default=None, metavar="N|HxW", help="image size in pixels")
    g.add_argument("--batch-size", type=_positive_int("batch size"), default=8)
    g.add_argument("--out", default="out", metavar="DIR", help="output directory (default ./out)")
    g.add_argument("--grid", action="store_true", help="also write a labelled contact sheet")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (slow first call; may flip rare bits)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="network precision; bfloat16 is faster on CPUs with native bf16 (avx512_bf16 or AMX) "
                        "but changes some bits, and is refused on CPUs without it (it would be ~100x slower)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert-official", help="convert the Instella-T2I release (or one checkpoint) for binlat")
    c.add_argument("--release", metavar="DIR", help="a download of the release (huggingface-cli download "
                   "amd/Instella-T2I --local-dir DIR): writes a complete pipeline bundle to --out")
    c.add_argument("--release-config", metavar="JSON", help='with --release: architecture override, JSON or a '
                   'file, {"bae": {...}, "diffusion": {...}, "ar": {...}} in the release\'s key names')
    c.add_argument("--kind", choices=["tokenizer", "diffusion", "ar"])
    c.add_argument("--config", metavar="CONFIG.json")
    c.add_argument("--weights", metavar="WEIGHTS", help=".safetensors or .pt ({'module': ...})")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32", help="precision the weights are stored in")
    c.add_argument("--scale", type=_reference_scale, metavar="N|none",
                   help="tokenizer only: reference size in pixels for positions (the release's set_scale), or none; "
                        "default: the config's \"scale\", or the release's inference value when the key is absent")
    c.set_defaults(func=cmd_convert_official)

    t = sub.add_parser("train", help="train a tokenizer, diffusion or AR model (runs under accelerate launch too)")
    t.add_argument("kind", choices=["tokenizer", "diffusion", "ar"])
    t.add_argument("--config", required=True, metavar="FILE.json", help="e.g. configs/tokenizer/shapes-64.json")
    t.add_argument("--data", metavar="SPEC", help="shapes | a folder | a .jsonl/.csv manifest | tar shards (URLs/globs)")
    t.add_argument("--max-steps", type=_positive_int("max steps"))
    t.add_argument("--batch-size", type=_positive_int("batch size"), help="global batch per optimiser step")
    t.add_argument("--output", metavar="DIR", help="run folder (default runs/KIND)")
    t.add_argument("--resume", metavar="latest|auto|CHECKPOINT",
                   help="continue from the run's latest checkpoint (auto: if it has one, else start fresh)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config entry, dotted for sections (repeatable): --set lr=1e-4 "
                        "--set generator.tokenizer=models/mine/tokenizer")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("probe", help="train a preset briefly with some changes and score it (one row per probe)")
    pr.add_argument("kind", choices=["tokenizer", "diffusion", "ar"])
    pr.add_argument("--config", required=True, metavar="CONFIG.json")
    pr.add_argument("--steps", type=_positive_int("steps"), required=True)
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="the change to try (repeatable), as in train")
    pr.add_argument("--change", help="the row's name (default: the --set entries)")
    pr.add_argument("--out", default="runs/probes", metavar="DIR", help="runs go to DIR/<name>, rows to DIR/probes.jsonl")
    pr.add_argument("--per-category", type=_positive_int("per category"), default=16)
    pr.add_argument("--sample-every", type=int, help="steps between held-out scores logged during training")
    pr.add_argument("--threads", type=_positive_int("threads"), help="torch intra-op threads (1 for side-by-side probes)")
    pr.set_defaults(func=cmd_probe)

    pc = sub.add_parser("precompute", help="encode a dataset once into bits (and text features) for generator training")
    pc.add_argument("--tokenizer", required=True, metavar="DIR")
    pc.add_argument("--data", required=True, metavar="SPEC")
    pc.add_argument("--out", required=True, metavar="DIR")
    pc.add_argument("--size", type=_positive_int("size"), help="image size (default: the tokenizer's)")
    pc.add_argument("--max-samples", type=_positive_int("max samples"), help="required for endless data (shapes)")
    pc.add_argument("--shard-size", type=_positive_int("shard size"), default=1024)
    pc.add_argument("--batch-size", type=_positive_int("batch size"), default=32)
    pc.add_argument("--seed", type=int, default=0)
    pc.add_argument("--text-encoder", default="all-MiniLM-L6-v2", metavar="NAME_OR_PATH")
    pc.add_argument("--text-max-length", type=_positive_int("text max length"), default=128)
    pc.add_argument("--text-layers", metavar="I,J,...", help="also store these text-encoder layers")
    pc.add_argument("--generator-layers", type=_positive_int("generator layers"),
                    help="also store text layers for a generator with this many blocks (evenly spaced map)")
    pc.add_argument("--no-progress", action="store_true")
    pc.set_defaults(func=cmd_precompute)

    pa = sub.add_parser("params", help="parameter counts of training presets")
    pa.add_argument("configs", nargs="+", metavar="CONFIG.json")
    pa.set_defaults(func=cmd_params)

    e = sub.add_parser("export", help="write a run's EMA weights as a model directory")
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--checkpoint", default="latest", metavar="latest|DIR")
    e.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32",
                   help="precision the weights are stored in (float16 halves the files)")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bundle", help="assemble a pipeline directory from trained model directories")
    b.add_argument("--tokenizer", required=True, metavar="DIR")
    b.add_argument("--diffusion", metavar="DIR")
    b.add_argument("--ar", metavar="DIR")
    b.add_argument("--text-encoder", default="all-MiniLM-L6-v2", metavar="NAME_OR_PATH")
    b.add_argument("--description", default="")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32",
                   help="precision the weights are stored in (float16 halves the files)")
    b.add_argument("--sampling", metavar="JSON",
                   help='the settings the model was tuned for, used when a call gives none, e.g. '
                        '\'{"diffusion": {"guidance_scale": 3, "num_steps": 20}, "ar": {"guidance_scale": 2}}\'')
    b.set_defaults(func=cmd_bundle)

    ed = sub.add_parser("edit", help="re-draw an image under a new prompt (diffusion from a partly noised start)")
    ed.add_argument("image", metavar="IMAGE")
    ed.add_argument("--prompt", required=True, help="what the edited image should show")
    ed.add_argument("--strength", type=_unit_interval("strength"), default=0.6,
                    help="how far to noise the image's bits: 0 keeps it, 1 ignores it (default 0.6)")
    _add_sampling_options(ed)
    ed.add_argument("--seed", type=int, default=None)
    _add_image_job_options(ed)
    ed.set_defaults(func=cmd_edit)

    ip = sub.add_parser("interpolate", help="a strip of images switching bit by bit from image A to image B")
    ip.add_argument("image_a", metavar="A")
    ip.add_argument("image_b", metavar="B")
    ip.add_argument("--steps", type=_at_least("steps", 2), default=8, help="frames, A and B included (default 8)")
    ip.add_argument("--seed", type=int, default=0, help="order in which bits switch (default 0)")
    _add_image_job_options(ip, progress=False)
    ip.set_defaults(func=cmd_interpolate)

    co = sub.add_parser("continue", help="keep an image's first tokens and let the AR generator write the rest")
    co.add_argument("image", metavar="IMAGE")
    co.add_argument("--prompt", required=True)
    co.add_argument("--keep-tokens", type=_at_least("keep tokens", 0), required=True, metavar="K",
                    help="tokens of the image to keep (0 .. the model's token count)")
    _add_sampling_options(co, ("cfg", "temperature"))
    co.add_argument("--seed", type=int, default=None)
    _add_image_job_options(co)
    co.set_defaults(func=cmd_continue)

    sv = sub.add_parser("serve", help="HTTP API and web page for a model (binds 127.0.0.1 unless told otherwise)")
    sv.add_argument("--model", metavar="DIR")
    sv.add_argument("--text-encoder", metavar="NAME_OR_PATH")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; anything else is reachable by others)")
    sv.add_argument("--port", type=_at_least("port", 0), default=7860, help="port (default 7860; 0 picks a free one)")
    sv.add_argument("--max-concurrent", type=_positive_int("max concurrent"), default=1,
                    help="generations running at once (default 1)")
    sv.add_argument("--max-queue", type=_positive_int("max queue"), default=8,
                    help="requests admitted at once, running + waiting; more get 429 (default 8)")
    sv.add_argument("--max-body-bytes", type=_positive_int("max body bytes"), default=16 * 2**20)
    sv.add_argument("--max-n", type=_positive_int("max n"), default=8, help="images per request (default 8)")
    sv.add_argument("--max-steps", type=_positive_int("max steps"), default=100)
    sv.add_argument("--max-prompt-chars", type=_positive_int("max prompt chars"), default=1000)
    sv.add_argument("--max-size", type=_positive_int("max size"), default=1024, help="pixels per side (default 1024)")
    sv.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    sv.set_defaults(func=cmd_serve)

    bn = sub.add_parser("bench", help="benchmark binlat against recomputation, more tokens and latent diffusion")
    bn.add_argument("--preset", choices=["shapes-64", "paper-512"], default="shapes-64",
                    help="model sizes (default shapes-64; paper-512 is far too slow on a CPU without --quick)")
    mode = bn.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats, composed baseline: minutes, not hours")
    mode.add_argument("--tiny", action="store_true", help="tiny widths, one run each: seconds (for tests)")
    bn.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    bn.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="evaluate: tokenizer reconstruction, the shapes benchmark, CLIP score, FID")
    evs = ev.add_subparsers(dest="eval_kind", required=True, metavar="{reconstruction,shapes,clip-score,fid}")

    def _eval_common(p: argparse.ArgumentParser, batch: int) -> None:
        p.add_argument("--batch-size", type=_positive_int("batch size"), default=batch)
        p.add_argument("--out", default="out/eval", metavar="DIR",
                       help="folder for the report and images (default out/eval)")
        p.add_argument("--json", metavar="FILE", help="report file (default <out>/report-<kind>.json)")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")

    er = evs.add_parser("reconstruction", help="tokenizer PSNR/SSIM(/LPIPS) vs JPEG and WebP at the same bytes")
    er.add_argument("--model", required=True, metavar="DIR", help="pipeline bundle or tokenizer directory")
    er.add_argument("--data", default="shapes", metavar="SPEC",
                    help="shapes (evaluation seed, unseen in training) | shapes:seed=N | folder | manifest | shards")
    er.add_argument("--num-images", type=_positive_int("num images"), default=64)
    er.add_argument("--size", type=_positive_int("size"), help="image side (default: the tokenizer's)")
    er.add_argument("--lpips-weights", metavar="FILE", help="local VGG16(/LPIPS) safetensors; LPIPS is skipped without")
    er.add_argument("--no-progress", action="store_true")
    _eval_common(er, 16)

    es = evs.add_parser("shapes", help="the compositional shapes benchmark, judged as shapes-spec says")
    es.add_argument("--model", metavar="DIR", help="pipeline bundle (or tokenizer directory with --ground-truth)")
    es.add_argument("--generator", choices=["diffusion", "ar"], default="diffusion")
    es.add_argument("--per-category", type=_positive_int("per category"), default=64)
    _add_sampling_options(es, ("steps", "cfg", "temperature"))
    es.add_argument("--seed", type=int, default=0, help="prompt-set seed; image i uses seed + i (default 0)")
    es.add_argument("--size", type=_positive_int("size"), help="image side (default: the model's; 64 for renders)")
    es.add_argument("--ground-truth", action="store_true",
                    help="judge renders of each prompt through the tokenizer instead of generating (its ceiling)")
    es.add_argument("--no-tokenizer", action="store_true",
                    help="with --ground-truth: judge the renders themselves (checks the evaluation; ~1.0)")
    es.add_argument("--no-held-out", action="store_true", help="skip the held-out compositions")
    es.add_argument("--text-encoder", metavar="NAME_OR_PATH")
    es.add_argument("--no-progress", action="store_true")
    _eval_common(es, 8)

    ec = evs.add_parser("clip-score", help="CLIP score of images against their prompts (local CLIP model)")
    ec.add_argument("--images", required=True, metavar="DIR")
    ec.add_argument("--prompts", metavar="FILE|metadata.jsonl",
                    help="one prompt per line (sorted image order) or metadata.jsonl (default <images>/metadata.jsonl)")
    ec.add_argument("--clip-model", metavar="LOCAL_DIR", help="local Hugging Face CLIP model directory")
    _eval_common(ec, 16)

    ef = evs.add_parser("fid", help="FID between two image folders (local FID Inception weights)")
    ef.add_argument("--real", required=True, metavar="DIR")
    ef.add_argument("--fake", required=True, metavar="DIR")
    ef.add_argument("--inception-weights", metavar="FILE",
                    help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth, on disk")
    _eval_common(ef, 32)
    ev.set_defaults(func=cmd_eval)

    k = sub.add_parser("conformance", help="check binlat against golden outputs of the reference implementation")
    k.add_argument("cases", nargs="+", metavar="CASE_DIR")
    k.set_defaults(func=cmd_conformance)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("binlat: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the CLI promise: one line, no traceback
        if args.debug:
            raise
        from .config import ConfigError
        from .io import WeightsError
        known = (CLIError, ValueError, OSError, ConfigError, WeightsError)
        prefix = "error" if isinstance(e, known) else f"internal error ({type(e).__name__})"
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"binlat: {prefix}: {message}", file=sys.stderr)
        if isinstance(e, WeightsError):  # a ValueError, but a file problem: exit 1 like other I/O failures
            return EXIT_FAILED
        return EXIT_USAGE if isinstance(e, (CLIError, ValueError, ConfigError)) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
