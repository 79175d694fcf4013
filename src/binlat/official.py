"""Conversion of the Instella-T2I release's checkpoints (its config keys and parameter names) into binlat models."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from . import jsondepth, registry
from .config import ConfigError
from .io import FileRefused, WeightsError, check_state_dict, load_safetensors, read_bounded
from .modeling import Network
from .registry import MODEL_CLASSES, TOKENIZER  # noqa: F401 (MODEL_CLASSES, kind -> model class, is public here)
from .tokenizer import TokenizerConfig
from .validators import check_int

# What the release's README and LICENSE say of its weights (github.com/AMD-AGI/Instella-T2I): a converted model
# keeps them, and its model card repeats them (binlat.card).
RELEASE_REPO = "amd/Instella-T2I"
RELEASE_LICENSE = {
    "id": "other",
    "name": "instella-t2i-research-only-rail-ms",
    "title": "Instella_T2I_1B RESEARCH-ONLY RAIL-MS",
    "link": "https://github.com/AMD-AGI/Instella-T2I/blob/main/LICENSE",
}
RELEASE_DATA = (
    "LAION-COCO, then LAION-COCO with synthetic image-text pairs 3:1 (Dalle-1M, and images of public "
    "models for DiffusionDB prompts), as the release's README says"
)


def release_provenance(kind: str) -> dict[str, Any]:
    """What a model converted from the release records of itself (binlat.card's provenance.json). Its captions
    were open-domain English: no vocabulary is kept, so no prompt is warned about."""
    return {
        "kind": kind,
        "made_by": "binlat convert-official",
        "converted_from": RELEASE_REPO,
        "license": dict(RELEASE_LICENSE),
        "data": RELEASE_DATA,
        "vocabulary": None,
    }


# Shared by every network: attention and tokenizer-style blocks. Each network's own renames (and the parameters
# it drops) are in its release_formats.ReleaseFormat.
_BLOCK_RULES = [
    (r"\.attn\.q_proj\.", ".attn.to_q."),
    (r"\.attn\.k_proj\.", ".attn.to_k."),
    (r"\.attn\.v_proj\.", ".attn.to_v."),
    (r"\.attn\.o_proj\.", ".attn.to_out."),
    (r"^transformer_blocks\.", "blocks."),
    (r"\.transformer_blocks\.", ".blocks."),
]


def _rules(kind: str) -> list[tuple[str, str]]:
    return _BLOCK_RULES + list(registry.release_format(kind).renames)


_TOKENIZER_KEYS = {
    "in_channels": "in_channels",
    "encoder_layers": "encoder_layers",
    "encoder_head_dim": "encoder_head_dim",
    "encoder_num_heads": "encoder_heads",
    "patch_size": "patch_size",
    "num_latent_tkns": "num_tokens",
    "axes_dims_rope": "rope_axes_dims",
    "downsample_idx": "downsample_after",
    "decoder_layers": "decoder_layers",
    "decoder_head_dim": "decoder_head_dim",
    "decoder_num_heads": "decoder_heads",
    "upsample_idx": "upsample_after",
    "codebook_size": "num_bits",
    "scale": "rope_reference_size",
    "train_temp": "bernoulli_temperature",
}
_TOKENIZER_IGNORED = {"use_repa", "repa_dim", "repa_index"}
# The release always decodes with set_scale(1024) (its test_diff.py, from diff_config.py), yet its bae_config.py has
# no "scale" key: a release config without the key gets this reference size, so the conversion decodes as it does.
RELEASE_SCALE = 1024
# `scale=FROM_CONFIG`: take the config's "scale" ("scale": null = no scaling), RELEASE_SCALE when the key is absent.
FROM_CONFIG = "from-config"
_GENERATOR_KEYS = {
    "in_channels": "num_bits",
    "num_layers": "num_layers",
    "attention_head_dim": "head_dim",
    "num_attention_heads": "num_heads",
    "num_img_tkns": "num_tokens",
    "text_cond_dim": "text_dim",
}
_GENERATOR_IGNORED = {"axes_dims_rope"}


def _translate(official: dict[str, Any], names: dict[str, str], ignored: set[str], source: str) -> dict[str, Any]:
    unknown = sorted(set(official) - set(names) - ignored)
    if unknown:
        raise ConfigError(
            f"{source}: unknown official config key(s) {unknown}; expected keys from {sorted(set(names) | ignored)}"
        )
    return {names[k]: v for k, v in official.items() if k in names and v is not None}


def _check_scale(kind: str, scale: Any) -> None:
    if scale == FROM_CONFIG:
        return
    if kind != TOKENIZER:
        raise ValueError(f"a scale applies only to a tokenizer, not to kind {kind!r}")
    if scale is not None:
        check_int("scale", scale, 1, note="pixels, or None for no scaling")


def convert_config(kind: str, official: dict[str, Any], source: str = "config", scale: int | None | str = FROM_CONFIG):
    """Official constructor kwargs -> binlat config dataclass. For a tokenizer, `scale` is the reference size in
    pixels passed to the release's `set_scale` (rope_reference_size, used to encode and decode), None for no
    scaling; FROM_CONFIG reads the config's "scale" and falls back to RELEASE_SCALE when the key is absent."""
    from .config import config_from_dict

    _check_scale(kind, scale)
    registry.release_format(kind)  # an unknown kind is a ValueError naming the known ones
    if kind == TOKENIZER:
        official = dict(official)
        official["scale"] = official.get("scale", RELEASE_SCALE) if scale == FROM_CONFIG else scale
        data = _translate(official, _TOKENIZER_KEYS, _TOKENIZER_IGNORED, source)
        # use_repa only adds a training-time projection head; its weights are dropped in convert_state_dict.
        for key in ("downsample_after", "upsample_after"):
            data[key] = sorted(data.get(key, []))
        return config_from_dict(TokenizerConfig, data, source)
    data = _translate(official, _GENERATOR_KEYS, _GENERATOR_IGNORED, source)
    return config_from_dict(registry.model_class(kind).config_class, data, source)


def convert_state_dict(kind: str, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename the release's parameters to binlat's; resampling layers are keyed by the block they follow."""
    rules, dropped = _rules(kind), registry.release_format(kind).dropped
    converted = {}
    for key, value in state.items():
        if dropped and re.search(dropped, key):
            continue
        new = key
        m = re.match(r"^(encoder\.down_layers|decoder\.up_layers)\.(\d+)\.(.*)$", key)
        if m and kind == TOKENIZER:
            stage, j, rest = m.group(1), int(m.group(2)), m.group(3)
            after = config.downsample_after if stage.startswith("encoder") else config.upsample_after
            if j >= len(after):
                raise WeightsError(f"unexpected key {key!r}: the config lists only {len(after)} resampling layers")
            new = f"{stage.split('.')[0]}.resample.{after[j]}.{rest}"
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        converted[new] = value
    return converted


def _unescape(pattern: str) -> tuple[str, bool, bool]:
    start, end = pattern.startswith("^"), pattern.endswith("$")
    return pattern.strip("^$").replace("\\", ""), start, end


def official_name(kind: str, key: str, config: Any) -> str:
    """The release's name for binlat parameter `key` (the rename rules run backwards), for error messages."""
    name = key
    for pattern, repl in reversed(_rules(kind)):
        literal, start, end = _unescape(pattern)
        name = re.sub(("^" if start else "") + re.escape(repl) + ("$" if end else ""), literal, name)
    m = re.match(r"^(encoder|decoder)\.resample\.(\d+)\.(.*)$", name)
    if m and kind == TOKENIZER:
        after = list(config.downsample_after if m.group(1) == "encoder" else config.upsample_after)
        stage = "encoder.down_layers" if m.group(1) == "encoder" else "decoder.up_layers"
        if int(m.group(2)) in after:
            name = f"{stage}.{after.index(int(m.group(2)))}.{m.group(3)}"
    return name


def load_official_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.safetensors` state dict, or the release's `.pt` holding {"module": state_dict}. The `.pt` is read with
    weights_only=True: a pickle that tries to build arbitrary objects (run code) is refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused to load: the file holds more than plain tensors "
            f"(weights_only=True rejected it: {str(e).splitlines()[0]})"
        ) from None
    except Exception as e:
        raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (or {{'module': state_dict}}) of tensors")
    return obj


def _torch_load(path: Path) -> Any:
    """weights_only always. Memory-mapped where the file's format allows (torch.save's zip format): the release's
    generators are gigabytes, and a mapped tensor costs memory only for the pages read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise
    except Exception:  # the legacy (non-zip) format cannot be mapped; a damaged file fails again just below
        return torch.load(path, map_location="cpu", weights_only=True)


def read_official_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = jsondepth.loads(read_bounded(path, what="config").decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except FileRefused as e:
        raise ConfigError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except jsondepth.JSONNestingError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def build_official(
    kind: str,
    config_path: str | Path,
    weights_path: str | Path,
    scale: int | None | str = FROM_CONFIG,
    allow_nonfinite: bool = False,
) -> Network:
    """Official config + weights -> a binlat model with those weights (eval mode); `scale` as in convert_config.
    Non-float or non-finite weights are a WeightsError naming the tensor (`allow_nonfinite`: NaN/inf load)."""
    registry.release_format(kind)  # an unknown kind is a ValueError naming the known ones
    _check_scale(kind, scale)  # before reading any file
    config = convert_config(kind, read_official_config(config_path), str(config_path), scale)
    from .budget import check_network

    check_network(registry.model_class(kind), config, str(config_path))  # before any weight is read
    with torch.device("meta"):  # names and shapes only; the file's tensors become the parameters
        model = registry.model_class(kind)(config)
    state = convert_state_dict(kind, load_official_weights(weights_path), config)
    check_state_dict(
        model, state, str(weights_path), name=lambda k: official_name(kind, k, config), allow_nonfinite=allow_nonfinite
    )
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def convert_official(
    kind: str,
    config_path: str | Path,
    weights_path: str | Path,
    out_dir: str | Path,
    scale: int | None | str = FROM_CONFIG,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write a binlat model directory (config.json + model.safetensors) from an official checkpoint.

    A tokenizer's `scale` (reference size in pixels, None for none) overrides the config's "scale"; by default a
    config without the key gets the release's RELEASE_SCALE, as the release decodes with set_scale(1024).
    `dtype` (e.g. torch.float16) stores the weights in that precision."""
    from .card import provenance_file

    model = build_official(kind, config_path, weights_path, scale, allow_nonfinite=allow_nonfinite)
    return model.save_pretrained(out_dir, dtype=dtype, files=provenance_file(release_provenance(kind)))
