"""Image editing in the binary latent space: every operation works on the tokenizer's K x B bits of an image.

- `edit`: noise the image's bits with the forward Bernoulli process to time `strength`, then denoise them with
  the diffusion generator under a new prompt (SDEdit in bit space). strength 0 returns the image's own bits;
  strength 1 draws the start exactly as plain generation does, so the input no longer matters.
- `interpolate`: a strip of frames whose bits switch from image A's to image B's in a fixed random order.
- `continue_ar`: keep the first k tokens of an image and let the autoregressive generator write the rest.

`edit` runs on a generator whose process can `redraw` (diffusion), `continue_ar` on one that can `continue_from`
(AR): `edit_generator` and `continue_generator` say which registered kind that is.

Every function takes a `Pipeline` and PIL images and returns a `PipelineOutput` (or a list of images).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import registry
from .generation import PipelineOutput, check_prompts, with_options
from .pipeline import Pipeline
from .processes.common import make_generators
from .validators import check_int, is_number, resolve_seed

# Decoded pixel budget for an input image (a small PNG can claim a huge canvas).
MAX_INPUT_PIXELS = 64 * 1024 * 1024


# --- images in ----------------------------------------------------------------------------------------------
def open_image(
    source: str | Path | bytes,
    name: str | None = None,
    max_pixels: int = MAX_INPUT_PIXELS,
    formats: list[str] | tuple[str, ...] | None = None,  # what Image.open takes
) -> Image.Image:
    """Read an image file (path or bytes) fully; anything unreadable is a ValueError (or OSError for a missing
    file) with a one-line message naming it. `formats` (Pillow's names, e.g. ("PNG", "JPEG", "WEBP")) limits the
    decoders tried: a file of any other format is refused before any of it is decoded."""
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded data")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as e:
        raise OSError(f"cannot read image {label}: {e.strerror or e}") from None
    with handle:
        try:
            image = Image.open(handle, formats=formats)
            width, height = image.size
        except Exception as e:  # noqa: BLE001 — decoders raise many types on malformed headers
            accepted = f" (accepted: {', '.join(formats)})" if formats and isinstance(e, UnidentifiedImageError) else ""
            raise ValueError(f"cannot read image {label}: {_why(e)}{accepted}") from None
        if width * height > max_pixels:
            raise ValueError(f"image {label} is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
        try:
            image.load()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read image {label}: {_why(e)}") from None
    return image


def _why(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not a recognised image format"
    text = str(e).strip()
    return text.splitlines()[0] if text else f"corrupt image data ({type(e).__name__})"


def _rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image; transparent pixels are laid on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _target_size(pipe: Pipeline, height: int | None, width: int | None) -> tuple[int, int]:
    height = pipe.config.image_size if height is None else height
    width = height if width is None else width
    check_int("height", height, 1, note="pixels")
    check_int("width", width, 1, note="pixels")
    pipe.tokenizer.check_size(height, width)
    pipe.check_work(None, 1, height, width)
    return height, width


def _device(pipe: Pipeline) -> torch.device:
    return next(pipe.tokenizer.parameters()).device


def load_image_for(
    pipe: Pipeline, image: Image.Image, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """A PIL image as the tokenizer's input: RGB, scaled so it covers height x width (default: the model's image
    size), centre-cropped to exactly that, as a [1, 3, H, W] float tensor in [-1, 1] on the tokenizer's device."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    height, width = _target_size(pipe, height, width)
    image = _rgb(image)
    src_w, src_h = image.size
    if src_w < 1 or src_h < 1:
        raise ValueError(f"image has no pixels ({src_w}x{src_h})")
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, math.ceil(src_w * scale - 1e-6)), max(height, math.ceil(src_h * scale - 1e-6))
    if (new_w, new_h) != (src_w, src_h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 127.5 - 1.0
    return pixels.permute(2, 0, 1)[None].to(_device(pipe))


@torch.inference_mode()
def image_bits(pipe: Pipeline, image: Image.Image, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The tokenizer's bits of an image: [1, K, B] float 0/1."""
    return pipe.tokenizer.encode(load_image_for(pipe, image, height, width)).float()


def decode_bits(
    pipe: Pipeline, bits: torch.Tensor, height: int | None = None, width: int | None = None
) -> list[Image.Image]:
    """Images of bits [N, K, B], each decoded alone (`Pipeline.decode`), so a frame or an edited image is the
    same picture whatever else was decoded with it."""
    height, width = _target_size(pipe, height, width)
    return pipe.decode(bits, height, width)


def reconstruct(
    pipe: Pipeline, image: Image.Image, height: int | None = None, width: int | None = None
) -> PipelineOutput:
    """Encode an image to bits and decode them again: what the tokenizer keeps of it."""
    height, width = _target_size(pipe, height, width)
    return _decoded(pipe, image_bits(pipe, image, height, width), [0], "", height, width)


def _decoded(
    pipe: Pipeline, bits: torch.Tensor, seeds: list[int], prompt: str, height: int, width: int
) -> PipelineOutput:
    """Bits [N, K, B] with their images, one seed each, all made under `prompt`."""
    return PipelineOutput(
        images=decode_bits(pipe, bits, height, width),
        seeds=seeds,
        bits=bits.to(torch.uint8).cpu(),
        prompts=[prompt] * len(seeds),
    )


def pack_bits_hex(bits: torch.Tensor) -> str:
    """Bits [K, B] (any 0/1 dtype) as hex: row-major, eight bits a byte, most significant bit first; the last
    byte is padded with zero bits when K x B is not a multiple of 8."""
    flat = bits.reshape(-1).to(torch.uint8).cpu().numpy()
    return np.packbits(flat).tobytes().hex()


def unpack_bits_hex(text: str, num_tokens: int, num_bits: int) -> torch.Tensor:
    """Inverse of `pack_bits_hex`: [K, B] uint8."""
    flat = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[: num_tokens * num_bits]
    if flat.size != num_tokens * num_bits:
        raise ValueError(f"hex holds {flat.size} bits; {num_tokens}x{num_bits} = {num_tokens * num_bits} needed")
    return torch.from_numpy(flat.copy()).view(num_tokens, num_bits)


# --- argument checks ----------------------------------------------------------------------------------------
def _generator_for(operation: str, available: Iterable[str]) -> str:
    kinds = registry.kinds_that_can(operation)
    if not kinds:
        raise ValueError(f"no registered generator offers {operation}")
    have = set(available)
    return next((k for k in kinds if k in have), kinds[0])


def edit_generator(available: Iterable[str] = ()) -> str:
    """The generator kind `edit` runs on: one whose process can redraw a partly noised start, one of `available`
    (a pipeline's generators) when it has one."""
    return _generator_for("redraw", available)


def continue_generator(available: Iterable[str] = ()) -> str:
    """The generator kind `continue_ar` runs on: one whose process can continue from kept tokens."""
    return _generator_for("continue_from", available)


def _check_generator(pipe: Pipeline, kind: str) -> None:
    if kind not in pipe.generators:
        raise ValueError(f"this operation needs the {kind} generator, but the model has only {sorted(pipe.generators)}")


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one text, got {type(prompt).__name__}")
    return check_prompts([prompt])[0]


def check_strength(strength: float) -> float:
    if not is_number(strength) or not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 ignores it), got {strength!r}")
    return float(strength)


def _options(
    *,
    seed: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
    progress: bool = False,
    **settings: Any,
) -> tuple[int | None, int | None, int | None, int, bool, dict[str, Any]]:
    """The options `edit` and `continue_ar` share, declared once here (help() shows them on both): image i of
    `num_images` uses seed `seed + i`; height and width default to the model's image size; `settings` are sampling
    settings as `Pipeline.__call__` takes them. Returned in that order, unchecked."""
    return seed, height, width, num_images, progress, settings


# --- edit ---------------------------------------------------------------------------------------------------
def _sampler_inputs(pipe: Pipeline, kind: str, prompt: str, seeds: list[int], settings: dict[str, Any]):
    """The network of generator `kind`, its process, and what its sampling calls take after their start: the
    prompt's features (one row per seed), the empty prompt's, one torch.Generator per seed and the settings."""
    network = pipe.generators[kind]
    layers = pipe.text_layers(kind)
    cond, uncond = pipe.encode_prompts([prompt])
    process = pipe.process(kind)
    generators = make_generators(seeds, next(network.parameters()).device)
    sampling = registry.generator(kind).sampling(settings)
    return network, process, (cond.index([0] * len(seeds)).select(layers), uncond.select(layers), generators, sampling)


@with_options(_options)
def edit(pipe: Pipeline, image: Image.Image, prompt: str, strength: float = 0.6, **options: Any) -> PipelineOutput:
    """Re-draw an image under `prompt`: bits x_0 of the image, x_t ~ Bernoulli(x_0 (1 - t) + t/2) at
    t = strength, then the diffusion sampler runs its `num_steps` steps from t = strength down to 0.
    `settings` are sampling settings as `Pipeline.__call__` takes them; those left out or None take the bundle's
    (`pipe.sampling_settings`), as plain generation does.

    Image i uses seed `seed + i` for both the noising and the sampling, drawn in the order plain generation
    draws them, so strength 1 gives exactly `pipe(prompt, seed=seed)` with the same settings. strength 0 samples
    nothing and returns the image's reconstruction bits."""
    seed, height, width, num_images, progress, settings = _options(**options)
    prompt = _check_prompt(prompt)
    strength = check_strength(strength)
    kind = edit_generator(pipe.generators)
    settings = pipe.sampling_settings(kind, **settings)
    check_int("number of images", num_images, 1)
    _check_generator(pipe, kind)
    height, width = _target_size(pipe, height, width)
    base = resolve_seed(seed, num_images)
    seeds = [base + i for i in range(num_images)]

    x0 = image_bits(pipe, image, height, width).expand(num_images, -1, -1).contiguous()
    if strength == 0.0:
        bits = x0
    else:
        network, process, inputs = _sampler_inputs(pipe, kind, prompt, seeds, settings)
        bits = process.redraw(network, x0, strength, *inputs, progress=progress)
    return _decoded(pipe, bits, seeds, prompt, height, width)


# --- interpolate --------------------------------------------------------------------------------------------
def interpolation_bits(bits_a: torch.Tensor, bits_b: torch.Tensor, steps: int = 8, seed: int = 0) -> torch.Tensor:
    """Frames [steps, K, B] uint8 between bits [K, B] (or [1, K, B]) of A and B. Each bit position gets one
    uniform u from `seed`; frame k takes B's bit where u < k / (steps - 1), else A's. The switched positions of
    a frame include those of every earlier frame, so frame 0 is A, the last frame is B, and the distance from A
    never shrinks."""
    check_int("steps", steps, 2)
    seed = resolve_seed(seed)
    a, b = (
        bits_a.reshape(bits_a.shape[-2:]).to(torch.uint8).cpu(),
        bits_b.reshape(bits_b.shape[-2:]).to(torch.uint8).cpu(),
    )
    if a.shape != b.shape:
        raise ValueError(f"bits of A {tuple(a.shape)} and B {tuple(b.shape)} differ in shape")
    u = torch.rand(a.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    frames = []
    for k in range(steps):
        take_b = u < k / (steps - 1)
        frames.append(torch.where(take_b, b, a))
    return torch.stack(frames)


def interpolate(
    pipe: Pipeline,
    image_a: Image.Image,
    image_b: Image.Image,
    steps: int = 8,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """`steps` images going from A's reconstruction to B's by switching bits (see `interpolation_bits`)."""
    check_int("steps", steps, 2)
    resolve_seed(seed)
    height, width = _target_size(pipe, height, width)
    frames = interpolation_bits(
        image_bits(pipe, image_a, height, width), image_bits(pipe, image_b, height, width), steps, seed
    )
    return decode_bits(pipe, frames, height, width)


def strip(images: Sequence[Image.Image], gap: int = 0) -> Image.Image:
    """Images side by side in one row (heights aligned at the top, white between them)."""
    if not images:
        raise ValueError("no images for a strip")
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    sheet = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        sheet.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return sheet


# --- AR continuation ----------------------------------------------------------------------------------------
@with_options(_options)
def continue_ar(pipe: Pipeline, image: Image.Image, prompt: str, keep_tokens: int, **options: Any) -> PipelineOutput:
    """Keep the first `keep_tokens` tokens of the image's bits and let the AR generator write the rest under
    `prompt`. keep_tokens = K returns the image's bits; keep_tokens = 0 is plain AR generation. Sampling settings
    (guidance_scale, temperature) left out or None take the bundle's AR settings (`pipe.sampling_settings`)."""
    seed, height, width, num_images, progress, settings = _options(**options)
    prompt = _check_prompt(prompt)
    kind = continue_generator(pipe.generators)
    settings = pipe.sampling_settings(kind, **settings)
    check_int("number of images", num_images, 1)
    _check_generator(pipe, kind)
    num_tokens = pipe.tokenizer.config.num_tokens
    check_int("keep_tokens", keep_tokens, 0, num_tokens, note=f"the image has {num_tokens} tokens")
    height, width = _target_size(pipe, height, width)
    base = resolve_seed(seed, num_images)
    seeds = [base + i for i in range(num_images)]

    x0 = image_bits(pipe, image, height, width).expand(num_images, -1, -1).contiguous()
    if keep_tokens == num_tokens:
        bits = x0
    else:
        network, process, inputs = _sampler_inputs(pipe, kind, prompt, seeds, settings)
        bits = process.continue_from(network, x0[:, :keep_tokens], *inputs, progress=progress)
    return _decoded(pipe, bits, seeds, prompt, height, width)
