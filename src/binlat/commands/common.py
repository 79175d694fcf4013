"""What the subcommands share: the one-line error, exit codes, the pipeline they load, and writing images."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from ..io import FileRefused, read_bounded

EXIT_USAGE, EXIT_FAILED = 2, 1
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def storage_dtype(name: str):
    """None keeps the weights' own float32; otherwise the torch dtype to store them in."""
    import torch

    return None if name == "float32" else getattr(torch, name)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            raw = read_bounded(args.prompts_file, what="prompts file")
        except FileRefused as e:
            raise CLIError(str(e)) from None
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


def load_pipeline(model: str | None, text_encoder: str | None, allow_nonfinite: bool = False):
    from ..pipeline import Pipeline, default_model_dir

    path = model or default_model_dir()
    if path is None:
        print(
            "note: no trained model is installed yet; using a randomly initialised tiny model, so the images "
            "are noise (pass --model DIR for a trained bundle)",
            file=sys.stderr,
        )
        from ..text import TextEncoder

        return Pipeline.random_tiny(text_encoder=TextEncoder(text_encoder) if text_encoder else None)
    if not Path(path).is_dir() and str(path).count("/") != 1:  # "org/name" may be a Hub id
        raise CLIError(f"model directory {path} does not exist (pass --model DIR with a binlat bundle)")
    return Pipeline.from_pretrained(path, text_encoder=text_encoder, allow_nonfinite=allow_nonfinite)


def warn_vocabulary(pipe, prompts, kind: str) -> None:
    """One stderr line naming the prompts' words that lie outside generator `kind`'s training vocabulary, if any
    (the pipeline then stays quiet about them for the rest of the run)."""
    from ..generation import check_prompts

    prompts = check_prompts(prompts)  # a bad prompt is its one-line error, not a warning first
    pipe.warn_vocabulary(prompts, kind, warn=lambda message: print(f"warning: {message}", file=sys.stderr))


def sampling_given(args: argparse.Namespace) -> dict:
    """The sampling settings the command's options give, by setting name (None where left out); the options are
    those arguments.add_sampling_options added."""
    return {setting: getattr(args, dest) for dest, setting in getattr(args, "sampling_options", {}).items()}


def resolve_sampling(pipe, kind: str, args: argparse.Namespace) -> dict:
    """The complete settings the run uses (Pipeline.sampling_settings): the options given, the pipeline's for
    those left out."""
    return pipe.sampling_settings(kind, **sampling_given(args))


def sampling_record(kind: str, settings: dict) -> dict:
    """The sampling settings a metadata line records: only those generator `kind` reads."""
    from ..generation import settings_record

    return settings_record(kind, settings)


def output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A unique probe file: two runs into one folder (threads of one process too) never share one.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CLIError(f"cannot write to output directory {out}: {e.strerror}") from None
    return out


def input_image(path: str):
    """The image at `path`; a missing file is an OSError (exit 1), a file that is no image a ValueError (exit 2),
    each one line naming the file."""
    from ..editing import open_image

    return open_image(path)


def png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ImageWriter:
    """Writes images into `out` under counter names (never from prompt text, so nothing can escape the folder),
    each with its metadata.jsonl line, as soon as they are made.

    A number is claimed by an exclusive create of a reservation file (.NNNNN.png.claim): of two runs writing into
    one folder at once, only one gets each number, so neither overwrites the other's image and every metadata line
    names the file its own run wrote. The PNG is then written atomically and the reservation removed."""

    NAME = re.compile(r"\.?(\d{5,})\.png(?:\.claim)?")

    def __init__(self, out: Path):
        self.out = out
        taken = [int(m.group(1)) for name in os.listdir(out) if (m := self.NAME.fullmatch(name))]
        self.next = max(taken, default=-1) + 1

    def write(self, images, records: list[dict]) -> list[str]:
        """Write the images, then append their metadata lines in one locked write; returns the file names."""
        from ..io import append_jsonl

        names = [self._write_one(image) for image in images]
        append_jsonl(self.out / "metadata.jsonl", [{"file": n, **r} for n, r in zip(names, records)])
        return names

    def _write_one(self, image) -> str:
        from ..io import atomic_write_bytes

        data = png_bytes(image)
        while True:
            n, self.next = self.next, self.next + 1
            name = f"{n:05d}.png"
            claim = self.out / f".{name}.claim"
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:  # another run holds this number right now
                continue
            try:
                if (self.out / name).exists():  # another run wrote it and let go of its claim
                    continue
                atomic_write_bytes(self.out / name, data)
                return name
            finally:
                claim.unlink(missing_ok=True)


def write_results(out: Path, images, records: list[dict]) -> list[str]:
    """Write images under newly claimed counter names and append their metadata lines (see ImageWriter)."""
    return ImageWriter(out).write(images, records)
