"""Argument types and option groups that the `binlat` parser (binlat.cli) shares between its commands: argparse
with one-line errors, numbers, seeds, sizes and memory sizes checked as they are parsed, and the sampling, memory
and image-job options several commands take."""

from __future__ import annotations

import argparse
import math
import re

from ..processes.common import MAX_STEPS
from ..validators import SEED_LIMIT
from .common import EXIT_USAGE, SAMPLING_SETTINGS


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


def protocol_value(text: str) -> int:
    if text.strip() not in ("1", "2"):
        raise argparse.ArgumentTypeError(f"protocol must be 1 or 2, got {text!r}")
    return int(text)


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


SAMPLING_OPTIONS = {  # option -> (argparse type, help); the Pipeline setting each gives is SAMPLING_SETTINGS's
    "steps": (positive_int("steps", MAX_STEPS), "diffusion steps"),
    "guidance_scale": (number("guidance scale", 0.0), "guidance scale w"),
    "temperature": (number("temperature", 0.0), "sampling temperature; 0 thresholds"),
    "rho": (number("rho", 0.0, inclusive=False), "time-step spacing exponent"),
    "protocol": (protocol_value, "diffusion step protocol, 1 or 2"),
}


# Other spellings accepted for an option: the short --cfg, and --num-steps, the name Python uses (diffusers').
SAMPLING_ALIASES = {"guidance_scale": ("cfg",), "steps": ("num-steps",)}


def add_sampling_options(parser: argparse.ArgumentParser, names=tuple(SAMPLING_OPTIONS)) -> None:
    """Sampling options default to None: the model bundle's tuned settings apply, else the built-in ones."""
    from ..pipeline import BUILTIN_SAMPLING

    for name in names:
        kind, text = SAMPLING_OPTIONS[name]
        default = BUILTIN_SAMPLING[SAMPLING_SETTINGS[name]]
        aliases = [f"--{alias}" for alias in SAMPLING_ALIASES.get(name, ())]
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            *aliases,
            dest=name,
            type=kind,
            default=None,
            help=f"{text} (default: the model's setting, else {default})",
        )


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
