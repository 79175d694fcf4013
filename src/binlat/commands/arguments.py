"""Argument types and option groups that the `binlat` parser (binlat.cli) shares between its commands: argparse
with one-line errors, numbers, seeds, sizes and memory sizes checked as they are parsed, and the sampling, memory
and image-job options several commands take."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from typing import Any

from ..validators import SEED_LIMIT
from .common import EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(name: str, high: int | None = None):
    return at_least(name, 1, high)


def seed_value(text: str) -> int:
    """--seed: image i uses seed + i, and torch takes seeds in [0, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed must be an integer in [0, 2**64 - 1], got {text}")
    return value


def number(name: str, low: float, inclusive: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(
                f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {text}"
            )
        return value

    return parse


def size_value(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be N or HxW in pixels (e.g. 64 or 64x96), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def reference_scale(text: str) -> int | str:
    """--scale: a reference size in pixels, or "none" (no position scaling)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return positive_int("scale")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"scale must be a positive integer (pixels) or none, got {text!r}") from None


def unit_interval(name: str):
    def parse(text: str) -> float:
        value = number(name, 0.0)(text)
        if value > 1:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {text}")
        return value

    return parse


def at_least(name: str, low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{name} must be at most {high}, got {value}")
        return value

    return parse


def _typed(setting, text: str) -> Any:
    """An option's text as its setting's type (the Settings field's annotation)."""
    kind = setting.value_type
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.strip().lower()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except (KeyError, ValueError):
        wanted = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise argparse.ArgumentTypeError(f"{setting.label} must be {wanted}, got {text!r}") from None
    return text  # any other type: its Settings judges the text


def setting_value(setting):
    """The argparse type of a sampling setting's option: the text as the setting's type, checked as the Settings
    that declares it checks it (binlat.sampling.check), so the CLI refuses what Python and HTTP refuse."""
    from ..sampling import check

    def parse(text: str) -> Any:
        value = _typed(setting, text)
        try:
            check({setting.name: value})
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


def add_sampling_options(parser: argparse.ArgumentParser, kinds: Sequence[str] | None = None) -> None:
    """One option per sampling setting of the generator `kinds` (default: every registered one), all read off their
    Settings dataclasses (binlat.sampling): named after the setting (its short name first: --steps, then
    --num-steps), typed and checked by its field, helped by its metadata. Options default to None: the model
    bundle's tuned settings apply, else the built-in ones. `sampling_options` (option dest -> setting) tells
    `sampling_given` which options they are."""
    from ..registry import generator_kinds
    from ..sampling import settings

    kinds = generator_kinds() if kinds is None else tuple(kinds)
    chosen = [s for s in settings().values() if set(s.kinds) & set(kinds)]
    for s in chosen:
        readers = [k for k in s.kinds if k in kinds]
        only = f"; read by {', '.join(readers)}" if len(readers) < len(kinds) else ""
        parser.add_argument(
            *s.options,
            dest=s.dest,
            type=setting_value(s),
            default=None,
            help=f"{s.help}{only} (default: the model's setting, else {s.default_text()})",
        )
    parser.set_defaults(sampling_options={s.dest: s.name for s in chosen})


def memory_value(text: str) -> int:
    from ..budget import parse_memory

    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"max memory: {e}") from None


def add_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        type=memory_value,
        metavar="SIZE",
        help="refuse work estimated to need more than this, e.g. 8G (default: the memory available; "
        "also $BINLAT_MAX_MEMORY)",
    )


NONFINITE_HELP = "load weights holding NaN or infinite values (refused by default, naming the tensor)"


def add_image_job_options(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """Options shared by the commands that load a pipeline and write images (edit, interpolate, continue)."""
    p.add_argument("--size", type=size_value, default=None, metavar="N|HxW", help="work size (default: the model's)")
    p.add_argument("--model", metavar="DIR", help="pipeline bundle directory (default: the shipped model)")
    p.add_argument("--allow-nonfinite-weights", action="store_true", help=NONFINITE_HELP)
    p.add_argument("--text-encoder", metavar="NAME_OR_PATH", help="override the bundle's text encoder")
    p.add_argument("--out", default="out", metavar="DIR", help="output directory (default ./out)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_memory_option(p)
