"""Commands that load a pipeline and make images: generate, edit, interpolate, continue, and serve."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from .common import (
    ImageWriter,
    input_image,
    load_pipeline,
    output_dir,
    png_bytes,
    read_prompts,
    resolve_sampling,
    sampling_record,
    warn_vocabulary,
    write_results,
)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.dtype == "bfloat16":  # refused before anything is loaded or created where it would be emulated
        from ..hardware import require_bf16

        require_bf16("cpu", "bfloat16 generation", fix="use --dtype float32")
    prompts = read_prompts(args)
    out = output_dir(args.out)
    pipe = load_pipeline(args.model, args.text_encoder, args.allow_nonfinite_weights)
    settings = resolve_sampling(pipe, args.generator, args)
    warn_vocabulary(pipe, prompts, args.generator)
    if args.dtype != "float32":
        import torch

        pipe.to(dtype=getattr(torch, args.dtype))
    if args.compile:
        pipe.compile()
    height, width = args.size or (None, None)
    fixed = {"generator": args.generator, **sampling_record(args.generator, settings)}
    writer, names = ImageWriter(out), []
    shown: tuple[list, list, list] = ([], [], [])  # images, prompts, seeds
    # Each batch's images and metadata lines are written as soon as it is decoded: a run stopped part way keeps
    # what it made.
    for part in pipe.batches(
        prompts,
        args.generator,
        seed=args.seed,
        height=height,
        width=width,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        **settings,
    ):
        records = [
            {
                "prompt": prompt,
                "seed": seed,
                **fixed,
                "height": image.height,
                "width": image.width,
                "dtype": args.dtype,
                "model": str(args.model or "default"),
                "trained": pipe.config.trained,
            }
            for image, prompt, seed in zip(part.images, part.prompts, part.seeds)
        ]
        names += writer.write(part.images, records)
        if args.grid:
            for kept, new in zip(shown, (part.images, part.prompts, part.seeds)):
                kept += new
    if args.grid:
        from ..grid import contact_sheet
        from ..io import atomic_write_bytes

        name = f"grid-{names[0][:-4]}.png"
        atomic_write_bytes(out / name, png_bytes(contact_sheet(*shown)))
        print(f"wrote {out / name}")
    print(f"wrote {len(names)} image(s) to {out} ({names[0]} .. {names[-1]}), metadata in {out / 'metadata.jsonl'}")
    return 0


def _image_job(args: argparse.Namespace, generator_for, make, job: str, detail: dict, summary: str) -> int:
    """An edit-style job (edit, continue): the output folder, the input image and the pipeline, checked in that
    order; the generator kind it runs on (`generator_for(pipe.generators)`) and the sampling settings it uses, those
    left out the pipeline's; then `make(pipe, image, seed=..., ...)`'s images, written with metadata lines of `job`,
    the source, `detail`, the kind and settings, and each image's prompt, seed and size. `summary` says in the
    closing line what was made."""
    out = output_dir(args.out)
    image = input_image(args.image)
    pipe = load_pipeline(args.model, args.text_encoder, args.allow_nonfinite_weights)
    kind = generator_for(pipe.generators)
    settings = resolve_sampling(pipe, kind, args)
    warn_vocabulary(pipe, [args.prompt], kind)
    height, width = args.size or (None, None)
    result = make(pipe, image, seed=args.seed, height=height, width=width, progress=not args.no_progress, **settings)
    fixed = {"kind": job, "source": str(args.image), **detail, "generator": kind, **sampling_record(kind, settings)}
    records = [
        {
            **fixed,
            "prompt": prompt,
            "seed": seed,
            "height": im.height,
            "width": im.width,
            "model": str(args.model or "default"),
            "trained": pipe.config.trained,
        }
        for im, prompt, seed in zip(result.images, result.prompts, result.seeds)
    ]
    names = write_results(out, result.images, records)
    print(f"wrote {out / names[0]} ({summary}, seed {result.seeds[0]}), metadata in {out / 'metadata.jsonl'}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from ..editing import edit, edit_generator

    return _image_job(
        args,
        edit_generator,
        partial(edit, prompt=args.prompt, strength=args.strength),
        "edit",
        {"strength": args.strength},
        f"edit of {args.image} at strength {args.strength:g}",
    )


def cmd_interpolate(args: argparse.Namespace) -> int:
    from ..editing import interpolate, strip
    from ..io import atomic_write_bytes

    out = output_dir(args.out)
    image_a, image_b = input_image(args.image_a), input_image(args.image_b)
    pipe = load_pipeline(args.model, args.text_encoder, args.allow_nonfinite_weights)
    height, width = args.size or (None, None)
    frames = interpolate(pipe, image_a, image_b, steps=args.steps, seed=args.seed, height=height, width=width)
    records = [
        {
            "kind": "interpolate",
            "a": str(args.image_a),
            "b": str(args.image_b),
            "frame": k,
            "fraction": k / (args.steps - 1),
            "seed": args.seed,
            "height": im.height,
            "width": im.width,
            "model": str(args.model or "default"),
            "trained": pipe.config.trained,
        }
        for k, im in enumerate(frames)
    ]
    names = write_results(out, frames, records)
    strip_name = f"strip-{names[0][:-4]}.png"
    atomic_write_bytes(out / strip_name, png_bytes(strip(frames)))
    print(
        f"wrote {out / strip_name} and {len(names)} frames ({names[0]} .. {names[-1]}), "
        f"metadata in {out / 'metadata.jsonl'}"
    )
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    from ..editing import continue_ar, continue_generator

    return _image_job(
        args,
        continue_generator,
        partial(continue_ar, prompt=args.prompt, keep_tokens=args.keep_tokens),
        "continue",
        {"keep_tokens": args.keep_tokens},
        f"first {args.keep_tokens} tokens of {args.image} kept",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import ServeLimits, allowed_hosts_for, bind_socket, create_app, serve

    limits = ServeLimits(
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_steps=args.max_steps,
        max_prompt_chars=args.max_prompt_chars,
        max_size=args.max_size,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
    )
    sock = bind_socket(args.host, args.port)  # before the model loads: a busy port fails at once
    try:
        allowed = allowed_hosts_for(args.host, args.allowed_host)
        pipe = load_pipeline(args.model, args.text_encoder)
        serve(create_app(pipe, limits, allowed), args.host, args.port, log_level=args.log_level, sock=sock)
    except KeyboardInterrupt:  # uvicorn has shut down gracefully and passes Ctrl+C on
        print("binlat: server stopped", file=sys.stderr)
    finally:
        sock.close()
    return 0
