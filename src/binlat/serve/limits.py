"""This server's limits, and the checks of a request against them and against the loaded model."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..pipeline import Pipeline
from ..validators import check_int
from .errors import ApiError


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for and how much work the server takes on at once."""

    max_concurrent: int = 1  # generations running at the same time (worker threads)
    max_queue: int = 8  # requests admitted at once (reading a body, waiting or running); more: 429
    max_body_bytes: int = 16 * 2**20  # request body size; more gets 413
    max_n: int = 8  # images per request (prompts x n)
    max_steps: int = 100  # diffusion steps
    max_prompt_chars: int = 1000  # characters per prompt
    max_size: int = 1024  # pixels per side
    # Connections (uvicorn; see runner.py). A hostile client must not hold the server with idle or slow sockets.
    max_connections: int = 64  # open connections served; a request beyond gets 503, and a connection
    #                                  opened while twice as many are open is closed at once
    header_timeout: int = 10  # seconds for a request's line and headers, from connecting or the last response
    body_timeout: int = 30  # seconds for the whole body, from when the server starts reading it; else 408
    keep_alive_timeout: int = 5  # seconds an idle kept-alive connection stays open
    max_header_bytes: int = 16 * 1024  # an unfinished request line + headers held; more is a 400

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            check_int(name, value, 1)
        if self.max_queue < self.max_concurrent:
            raise ValueError(
                f"max_queue ({self.max_queue}) counts running requests too, so it must be at least "
                f"max_concurrent ({self.max_concurrent})"
            )


def parse_size(value: int | str | list[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, list):
        if len(value) != 2:
            raise ApiError(422, f"size: a list must be [H, W], got {len(value)} numbers")
        return value[0], value[1]
    m = re.fullmatch(r"\s*(\d{1,6})\s*(?:[xX]\s*(\d{1,6}))?\s*", value)
    if not m:
        raise ApiError(422, f"size: must be N, 'HxW' or [H, W] in pixels, got {value!r}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


class Checks:
    """Each check raises a 422 ApiError naming the field and the limit; those that settle a value return it."""

    def __init__(self, pipe: Pipeline, limits: ServeLimits):
        self.pipe, self.limits = pipe, limits

    def size(self, value: int | str | list[int] | None) -> tuple[int, int]:
        size = parse_size(value)
        if size is None:
            image = self.pipe.config.image_size
            size = (image, image)
        h, w = size
        if min(h, w) < 1:
            raise ApiError(422, f"size: {h}x{w} is not a positive size")
        if max(h, w) > self.limits.max_size:
            raise ApiError(
                422, f"size: {h}x{w} is over this server's limit of {self.limits.max_size} px per side (max_size)"
            )
        try:
            self.pipe.tokenizer.check_size(h, w)
        except ValueError as e:
            raise ApiError(422, f"size: {e}") from None
        return h, w

    def prompt(self, text: str, field: str = "prompt") -> str:
        if not text.strip():
            raise ApiError(422, f"{field}: empty; describe the image")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows "\ud800"; the text encoder cannot take it
            raise ApiError(
                422, f"{field}: not valid Unicode text (unpaired surrogate at character {e.start})"
            ) from None
        if len(text) > self.limits.max_prompt_chars:
            raise ApiError(
                422,
                f"{field}: {len(text)} characters is over this server's limit of "
                f"{self.limits.max_prompt_chars} (max_prompt_chars)",
            )
        return text

    def steps(self, steps: int | None, default: int) -> int:
        """The request's steps, else the model's `default` capped by this server's max_steps."""
        if steps is None:
            return min(default, self.limits.max_steps)
        if steps > self.limits.max_steps:
            raise ApiError(
                422, f"num_steps: {steps} is over this server's limit of {self.limits.max_steps} (max_steps)"
            )
        return steps

    def count(self, total: int, detail: str) -> None:
        if total > self.limits.max_n:
            raise ApiError(
                422,
                f"n: {total} images ({detail}) is over this server's limit of {self.limits.max_n} per request (max_n)",
            )

    def generator(self, kind: str) -> None:
        if kind not in self.pipe.generators:
            raise ApiError(422, f"generator: {kind!r} is not in this model; available: {sorted(self.pipe.generators)}")
