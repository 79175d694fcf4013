"""What a training preset builds: its kind, token grid, image size, architecture and parameter count (`binlat
params`, and the test that holds README.md's preset figures to them).

Networks are built on the meta device (no memory, no weights). A generator's token grid is what its run would
take: the preset's own `model.num_tokens`/`num_bits` where it sets them, else its `generator.tokenizer`'s, read from
that model directory's config when it is on this machine (the shipped `default/tokenizer`, a local folder; never
the Hub), else the class defaults, and `grid_from` says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import registry
from ..registry import TOKENIZER


@dataclass(frozen=True)
class PresetFacts:
    kind: str
    num_tokens: int
    num_bits: int
    image_size: int
    parameters: int
    architecture: str  # e.g. "patch 8, 2L×128 encoder, 4L×128 decoder" or "6L×192 over all-MiniLM-L6-v2"
    grid_from: str  # "the preset", "tokenizer default/tokenizer", or "class defaults (...)"

    @property
    def grid(self) -> str:
        return f"{self.num_tokens} × {self.num_bits}"

    @property
    def millions(self) -> str:
        """The count as README.md and `binlat params` write it: "4.6 M", "1,292.5 M"."""
        return f"{self.parameters / 1e6:,.1f} M"


def _local_tokenizer_config(name: str) -> Any | None:
    """The config of tokenizer model directory `name` when it is on this machine, else None (no Hub lookup)."""
    from ..modeling import CONFIG_NAME, named_model_dir
    from ..tokenizer import BinaryTokenizer

    if not name:
        return None
    try:
        directory = named_model_dir(name) or Path(name)
    except FileNotFoundError:  # "default/..." where no shipped model is installed
        return None
    if not (directory / CONFIG_NAME).is_file():
        return None
    return BinaryTokenizer.read_config(directory)


def architecture(kind: str, config: Any, text_encoder: str = "") -> str:
    """A network's shape in the README's notation: blocks × width (heads × head size), the tokenizer's patch,
    2×2 resampling and position reference size."""
    if kind == TOKENIZER:
        c = config
        parts = [
            f"patch {c.patch_size}",
            f"{c.encoder_layers}L×{c.encoder_heads * c.encoder_head_dim} encoder",
            f"{c.decoder_layers}L×{c.decoder_heads * c.decoder_head_dim} decoder",
        ]
        if c.downsample_after:
            parts.append("2×2 after block " + "/".join(str(i) for i in c.downsample_after))
        if c.rope_reference_size:
            parts.append(f"reference {c.rope_reference_size}")
        return ", ".join(parts)
    return f"{config.num_layers}L×{config.num_heads * config.head_dim}" + (
        f" over {text_encoder}" if text_encoder else ""
    )


def preset_facts(preset: str | Path) -> PresetFacts:
    """The facts of a training preset (a packaged name such as "diffusion/shapes-64", or a config file)."""
    import torch

    from ..config import load_config
    from .config import TrainConfig

    cfg = load_config(TrainConfig, preset)
    resolved: dict[str, Any] = {"image_size": cfg.image_size}
    grid_from, text_encoder = "the preset", ""
    if cfg.kind != TOKENIZER:
        text_encoder = cfg.generator.text_encoder
        preset_sets = {"num_tokens", "num_bits"} <= set(cfg.model)
        tok = None if preset_sets else _local_tokenizer_config(cfg.generator.tokenizer)
        if tok is not None:
            resolved |= {"num_tokens": tok.num_tokens, "num_bits": tok.num_bits}
            grid_from = f"tokenizer {cfg.generator.tokenizer}"
        elif not preset_sets:
            grid_from = f"class defaults (tokenizer {cfg.generator.tokenizer or '(none)'} is not on this machine)"
    config = cfg.model_config(**resolved)
    with torch.device("meta"):
        model = registry.model_class(cfg.kind)(config)
    return PresetFacts(
        kind=cfg.kind,
        num_tokens=config.num_tokens,
        num_bits=config.num_bits,
        image_size=cfg.image_size,
        parameters=sum(p.numel() for p in model.parameters()),
        architecture=architecture(cfg.kind, config, text_encoder),
        grid_from=grid_from,
    )
