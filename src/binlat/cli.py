"""The `binlat` command: a thin layer that parses arguments, calls the public API and prints results.

Every expected failure (bad argument, unreadable file, mismatched weights) ends with a one-line message and a
non-zero exit code; a traceback is shown only with --debug. This module is the parser; the commands are in
binlat.commands (one module per idea), the argument types and shared option groups in binlat.commands.arguments."""

from __future__ import annotations

import argparse
import sys

from .budget import limited
from .commands.arguments import (
    NONFINITE_HELP,
    Parser,
    add_image_job_options,
    add_memory_option,
    add_sampling_options,
    at_least,
    positive_int,
    reference_scale,
    seed_value,
    size_value,
    unit_interval,
)
from .commands.common import EXIT_FAILED, EXIT_USAGE, STORAGE_DTYPES, CLIError
from .commands.evaluation import cmd_bench, cmd_eval
from .commands.images import cmd_continue, cmd_edit, cmd_generate, cmd_interpolate, cmd_serve
from .commands.models import cmd_bundle, cmd_card, cmd_conformance, cmd_convert_official
from .commands.training import cmd_config_show, cmd_export, cmd_params, cmd_precompute, cmd_probe, cmd_train
from .registry import generator_kinds, kinds_that_can, model_kinds, release_kinds

MAX_FRAMES = 1000  # interpolate --steps


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="binlat", description="Text-to-image generation in a 1D binary latent space.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from prompts")
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    g.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="file with one prompt per line")
    g.add_argument(
        "--model",
        metavar="DIR",
        help="pipeline bundle, or the Instella-T2I release (its download "
        "folder, or amd/Instella-T2I once in the Hugging Face cache) (default: the shipped model)",
    )
    g.add_argument(
        "--text-encoder",
        metavar="NAME_OR_PATH",
        help="override the bundle's text encoder (e.g. amd/AMD-OLMo-1B or a local path)",
    )
    g.add_argument("--allow-nonfinite-weights", action="store_true", help=NONFINITE_HELP)
    g.add_argument("--generator", choices=generator_kinds(), default="diffusion")
    add_sampling_options(g)
    g.add_argument("--seed", type=seed_value, default=None, help="base seed; image i uses seed + i")
    g.add_argument("--size", type=size_value, default=None, metavar="N|HxW", help="image size in pixels")
    g.add_argument("--batch-size", type=positive_int("batch size"), default=8)
    g.add_argument("--out", default="out", metavar="DIR", help="output directory (default ./out)")
    g.add_argument("--grid", action="store_true", help="also write a labelled contact sheet")
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the networks (slow first call; may flip rare bits)"
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="network precision; bfloat16 is faster on CPUs with native bf16 (avx512_bf16 or AMX) "
        "but changes some bits, and is refused on CPUs without it (it would be ~100x slower)",
    )
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_memory_option(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert-official", help="convert the Instella-T2I release (or one checkpoint) for binlat")
    c.add_argument(
        "--release",
        metavar="DIR",
        help="a download of the release (huggingface-cli download "
        "amd/Instella-T2I --local-dir DIR): writes a complete pipeline bundle to --out",
    )
    c.add_argument(
        "--release-config",
        metavar="JSON",
        help="with --release: architecture override, JSON or a "
        'file, {"bae": {...}, "diffusion": {...}, "ar": {...}} in the release\'s key names',
    )
    c.add_argument("--kind", choices=release_kinds())
    c.add_argument("--config", metavar="CONFIG.json")
    c.add_argument("--weights", metavar="WEIGHTS", help=".safetensors or .pt ({'module': ...})")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32", help="precision the weights are stored in")
    c.add_argument("--allow-nonfinite-weights", action="store_true", help=NONFINITE_HELP)
    c.add_argument(
        "--scale",
        type=reference_scale,
        metavar="N|none",
        help="tokenizer only: reference size in pixels for positions (the release's set_scale), or none; "
        "default: the config's \"scale\", or the release's inference value when the key is absent",
    )
    add_memory_option(c)
    c.set_defaults(func=cmd_convert_official)

    ALLOW = (
        "let --data name shard URLs, which webdataset opens by running a program (pipe: runs a shell command; "
        "http(s):, gs:, hf: run curl or gsutil); applies to the --data typed here, never to a config file"
    )
    t = sub.add_parser("train", help="train a tokenizer, diffusion or AR model (runs under accelerate launch too)")
    t.add_argument("kind", choices=model_kinds())
    t.add_argument("--config", required=True, metavar="FILE.json", help="e.g. configs/tokenizer/shapes-64.json")
    t.add_argument(
        "--data", metavar="SPEC", help="shapes | a folder | a .jsonl/.csv manifest | tar shards (paths/globs)"
    )
    t.add_argument("--allow-data-commands", action="store_true", help=ALLOW)
    t.add_argument(
        "--unconditional",
        action="store_true",
        help="generators: the data is meant to have no captions (silences the warning that says so)",
    )
    t.add_argument("--max-steps", type=positive_int("max steps"))
    t.add_argument("--batch-size", type=positive_int("batch size"), help="global batch per optimiser step")
    t.add_argument("--output", metavar="DIR", help="run folder (default runs/KIND)")
    t.add_argument(
        "--resume",
        metavar="latest|auto|CHECKPOINT",
        help="continue from the run's latest checkpoint (auto: if it has one, else start fresh)",
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config entry, dotted for sections (repeatable): --set lr=1e-4 "
        "--set generator.tokenizer=models/mine/tokenizer",
    )
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("probe", help="train a preset briefly with some changes and score it (one row per probe)")
    pr.add_argument("kind", choices=model_kinds())
    pr.add_argument("--config", required=True, metavar="CONFIG.json")
    pr.add_argument("--steps", type=positive_int("steps"), required=True)
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="the change to try (repeatable), as in train")
    pr.add_argument("--change", help="the row's name (default: the --set entries)")
    pr.add_argument(
        "--out", default="runs/probes", metavar="DIR", help="runs go to DIR/<name>, rows to DIR/probes.jsonl"
    )
    pr.add_argument("--per-category", type=positive_int("per category"), default=16)
    pr.add_argument("--sample-every", type=int, help="steps between held-out scores logged during training")
    pr.add_argument(
        "--threads", type=positive_int("threads"), help="torch intra-op threads (1 for side-by-side probes)"
    )
    pr.set_defaults(func=cmd_probe)

    pc = sub.add_parser("precompute", help="encode a dataset once into bits (and text features) for generator training")
    pc.add_argument("--tokenizer", required=True, metavar="DIR")
    pc.add_argument("--data", required=True, metavar="SPEC")
    pc.add_argument("--allow-data-commands", action="store_true", help=ALLOW)
    pc.add_argument("--out", required=True, metavar="DIR")
    pc.add_argument("--size", type=positive_int("size"), help="image size (default: the tokenizer's)")
    pc.add_argument("--max-samples", type=positive_int("max samples"), help="required for endless data (shapes)")
    pc.add_argument("--shard-size", type=positive_int("shard size"), default=1024)
    pc.add_argument("--batch-size", type=positive_int("batch size"), default=32)
    pc.add_argument("--seed", type=seed_value, default=0)
    pc.add_argument("--text-encoder", default="all-MiniLM-L6-v2", metavar="NAME_OR_PATH")
    pc.add_argument("--text-max-length", type=positive_int("text max length"), default=128)
    pc.add_argument("--text-layers", metavar="I,J,...", help="also store these text-encoder layers")
    pc.add_argument(
        "--generator-layers",
        type=positive_int("generator layers"),
        help="also store text layers for a generator with this many blocks (evenly spaced map)",
    )
    pc.add_argument("--no-progress", action="store_true")
    pc.set_defaults(func=cmd_precompute)

    cs = sub.add_parser(
        "config",
        help="training presets: `config show PRESET [--set KEY=VALUE ...]` prints every "
        "key with its value, type, default and help",
    )
    css = cs.add_subparsers(dest="config_command", required=True)
    show = css.add_parser("show", help="every key of a preset (by name, e.g. diffusion/shapes-64) or config file")
    show.add_argument("preset", metavar="PRESET")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key first, as in train")
    show.set_defaults(func=cmd_config_show)

    pa = sub.add_parser("params", help="parameter counts of training presets")
    pa.add_argument("configs", nargs="+", metavar="CONFIG.json")
    pa.set_defaults(func=cmd_params)

    e = sub.add_parser("export", help="write a run's EMA weights as a model directory")
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--checkpoint", default="latest", metavar="latest|DIR")
    e.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default="float32",
        help="precision the weights are stored in (float16 halves the files)",
    )
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bundle", help="assemble a pipeline directory from trained model directories")
    b.add_argument("--tokenizer", required=True, metavar="DIR")
    for kind in generator_kinds():
        b.add_argument(f"--{kind}", metavar="DIR")
    b.add_argument("--text-encoder", default="all-MiniLM-L6-v2", metavar="NAME_OR_PATH")
    b.add_argument("--description", default="")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default="float32",
        help="precision the weights are stored in (float16 halves the files)",
    )
    b.add_argument(
        "--sampling",
        metavar="JSON",
        help="the settings the model was tuned for, used when a call gives none, e.g. "
        '\'{"diffusion": {"guidance_scale": 3, "num_steps": 20}, "ar": {"guidance_scale": 2}}\'',
    )
    b.add_argument(
        "--eval",
        action="append",
        metavar="REPORT|DIR",
        help="evaluation report(s) of these weights for the model card's scores (repeatable; a folder "
        "gives its report-*.json files that measured this bundle)",
    )
    b.set_defaults(func=cmd_bundle)

    cd = sub.add_parser(
        "card",
        help="write a bundle's model card (README.md) and vocabulary again, e.g. after an "
        "evaluation: from its parts' provenance.json and --eval reports",
    )
    cd.add_argument("bundle", metavar="DIR")
    cd.add_argument(
        "--eval",
        action="append",
        metavar="REPORT|DIR",
        help="evaluation report(s) for the scores (repeatable; a folder gives its report-*.json files "
        "that measured DIR)",
    )
    cd.set_defaults(func=cmd_card)

    ed = sub.add_parser("edit", help="re-draw an image under a new prompt (diffusion from a partly noised start)")
    ed.add_argument("image", metavar="IMAGE")
    ed.add_argument("--prompt", required=True, help="what the edited image should show")
    ed.add_argument(
        "--strength",
        type=unit_interval("strength"),
        default=0.6,
        help="how far to noise the image's bits: 0 keeps it, 1 ignores it (default 0.6)",
    )
    add_sampling_options(ed, kinds_that_can("redraw"))
    ed.add_argument("--seed", type=seed_value, default=None)
    add_image_job_options(ed)
    ed.set_defaults(func=cmd_edit)

    ip = sub.add_parser("interpolate", help="a strip of images switching bit by bit from image A to image B")
    ip.add_argument("image_a", metavar="A")
    ip.add_argument("image_b", metavar="B")
    ip.add_argument(
        "--steps",
        type=at_least("steps", 2, MAX_FRAMES),
        default=8,
        help=f"frames, A and B included (default 8, at most {MAX_FRAMES})",
    )
    ip.add_argument("--seed", type=seed_value, default=0, help="order in which bits switch (default 0)")
    add_image_job_options(ip, progress=False)
    ip.set_defaults(func=cmd_interpolate)

    co = sub.add_parser("continue", help="keep an image's first tokens and let the AR generator write the rest")
    co.add_argument("image", metavar="IMAGE")
    co.add_argument("--prompt", required=True)
    co.add_argument(
        "--keep-tokens",
        type=at_least("keep tokens", 0),
        required=True,
        metavar="K",
        help="tokens of the image to keep (0 .. the model's token count)",
    )
    add_sampling_options(co, kinds_that_can("continue_from"))
    co.add_argument("--seed", type=seed_value, default=None)
    add_image_job_options(co)
    co.set_defaults(func=cmd_continue)

    sv = sub.add_parser("serve", help="HTTP API and web page for a model (binds 127.0.0.1 unless told otherwise)")
    sv.add_argument("--model", metavar="DIR")
    sv.add_argument("--text-encoder", metavar="NAME_OR_PATH")
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; anything else is reachable by others)",
    )
    sv.add_argument("--port", type=at_least("port", 0), default=7860, help="port (default 7860; 0 picks a free one)")
    sv.add_argument(
        "--max-concurrent",
        type=positive_int("max concurrent"),
        default=1,
        help="generations running at once (default 1)",
    )
    sv.add_argument(
        "--max-queue",
        type=positive_int("max queue"),
        default=8,
        help="requests admitted at once, running + waiting; more get 429 (default 8)",
    )
    sv.add_argument("--max-body-bytes", type=positive_int("max body bytes"), default=16 * 2**20)
    sv.add_argument("--max-n", type=positive_int("max n"), default=8, help="images per request (default 8)")
    sv.add_argument("--max-steps", type=positive_int("max steps"), default=100)
    sv.add_argument("--max-prompt-chars", type=positive_int("max prompt chars"), default=1000)
    sv.add_argument("--max-size", type=positive_int("max size"), default=1024, help="pixels per side (default 1024)")
    sv.add_argument(
        "--max-connections",
        type=positive_int("max connections"),
        default=64,
        help="open connections served; a request beyond gets 503 (default 64)",
    )
    sv.add_argument(
        "--header-timeout",
        type=positive_int("header timeout"),
        default=10,
        metavar="SECONDS",
        help="a connection must send a request's headers within this (default 10)",
    )
    sv.add_argument(
        "--body-timeout",
        type=positive_int("body timeout"),
        default=30,
        metavar="SECONDS",
        help="a request body must arrive within this, else 408 (default 30)",
    )
    sv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this Host name (repeatable; '*.example.org' for subdomains); "
        "loopback names and --host are always allowed, any other is refused (DNS rebinding)",
    )
    sv.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    add_memory_option(sv)
    sv.set_defaults(func=cmd_serve)

    bn = sub.add_parser("bench", help="benchmark binlat against recomputation, more tokens and latent diffusion")
    bn.add_argument(
        "--preset",
        choices=["shapes-64", "paper-512"],
        default="shapes-64",
        help="model sizes (default shapes-64; paper-512 is far too slow on a CPU without --quick)",
    )
    mode = bn.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats, composed baseline: minutes, not hours")
    mode.add_argument("--tiny", action="store_true", help="tiny widths, one run each: seconds (for tests)")
    bn.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    bn.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="evaluate: tokenizer reconstruction, the shapes benchmark, CLIP score, FID")
    evs = ev.add_subparsers(dest="eval_kind", required=True, metavar="{reconstruction,shapes,clip-score,fid}")

    def _eval_common(p: argparse.ArgumentParser, batch: int) -> None:
        p.add_argument("--batch-size", type=positive_int("batch size"), default=batch)
        p.add_argument(
            "--out", default="out/eval", metavar="DIR", help="folder for the report and images (default out/eval)"
        )
        p.add_argument("--json", metavar="FILE", help="report file (default <out>/report-<kind>.json)")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")

    er = evs.add_parser("reconstruction", help="tokenizer PSNR/SSIM(/LPIPS) vs JPEG and WebP at the same bytes")
    er.add_argument("--model", required=True, metavar="DIR", help="pipeline bundle or tokenizer directory")
    er.add_argument(
        "--data",
        default="shapes",
        metavar="SPEC",
        help="shapes (evaluation seed, unseen in training) | shapes:seed=N | folder | manifest | shards",
    )
    er.add_argument("--allow-data-commands", action="store_true", help=ALLOW)
    er.add_argument("--num-images", type=positive_int("num images"), default=64)
    er.add_argument("--size", type=positive_int("size"), help="image side (default: the tokenizer's)")
    er.add_argument("--lpips-weights", metavar="FILE", help="local VGG16(/LPIPS) safetensors; LPIPS is skipped without")
    er.add_argument("--no-progress", action="store_true")
    _eval_common(er, 16)

    es = evs.add_parser("shapes", help="the compositional shapes benchmark, judged as shapes-spec says")
    es.add_argument("--model", metavar="DIR", help="pipeline bundle (or tokenizer directory with --ground-truth)")
    es.add_argument("--generator", choices=generator_kinds(), default="diffusion")
    es.add_argument("--per-category", type=positive_int("per category"), default=64)
    add_sampling_options(es)
    es.add_argument("--seed", type=seed_value, default=0, help="prompt-set seed; image i uses seed + i (default 0)")
    es.add_argument("--size", type=positive_int("size"), help="image side (default: the model's; 64 for renders)")
    es.add_argument(
        "--ground-truth",
        action="store_true",
        help="judge renders of each prompt through the tokenizer instead of generating (its ceiling)",
    )
    es.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="with --ground-truth: judge the renders themselves (checks the evaluation; ~1.0)",
    )
    es.add_argument("--no-held-out", action="store_true", help="skip the held-out compositions")
    es.add_argument("--text-encoder", metavar="NAME_OR_PATH")
    es.add_argument("--no-progress", action="store_true")
    _eval_common(es, 8)

    ec = evs.add_parser("clip-score", help="CLIP score of images against their prompts (local CLIP model)")
    ec.add_argument("--images", required=True, metavar="DIR")
    ec.add_argument(
        "--prompts",
        metavar="FILE|metadata.jsonl",
        help="one prompt per line (sorted image order) or metadata.jsonl (default <images>/metadata.jsonl)",
    )
    ec.add_argument("--clip-model", metavar="LOCAL_DIR", help="local Hugging Face CLIP model directory")
    _eval_common(ec, 16)

    ef = evs.add_parser("fid", help="FID between two image folders (local FID Inception weights)")
    ef.add_argument("--real", required=True, metavar="DIR")
    ef.add_argument("--fake", required=True, metavar="DIR")
    ef.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth, on disk",
    )
    _eval_common(ef, 32)
    ev.set_defaults(func=cmd_eval)

    k = sub.add_parser("conformance", help="check binlat against golden outputs of the reference implementation")
    k.add_argument("cases", nargs="+", metavar="CASE_DIR")
    k.set_defaults(func=cmd_conformance)
    _add_threads_everywhere(sub)
    return parser


# Commands that compute nothing worth threads.
_NO_THREADS = {"params", "export", "bundle", "card", "conformance"}


def _add_threads_everywhere(sub) -> None:
    """--threads N on every command that computes (nested ones such as `eval shapes` too), unless it has one."""
    for name, command in sub.choices.items():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_threads_everywhere(nested[0])
        elif name not in _NO_THREADS and not any("--threads" in a.option_strings for a in command._actions):
            command.add_argument(
                "--threads",
                type=positive_int("threads"),
                help="torch intra-op threads (default: torch's, usually one per core)",
            )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        with limited(getattr(args, "max_memory", None)):
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
