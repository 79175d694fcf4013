"""The Instella-T2I release as one unit: a download of `amd/Instella-T2I` -> one binlat pipeline bundle.

The release's architectures are facts kept here (never read from, let alone run, its Python config files). Its
files are recognised by their keys, so a renamed file is still found; every `.pt` is read with weights_only.
`resolve_pipeline_dir` lets Pipeline.from_pretrained take the download folder (or the Hub id) directly: the folder
is converted once into a bundle in the Hugging Face cache, keyed by the files' hashes, and read from there after."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import jsondepth, registry
from .bundle import INDEX_NAME, PipelineConfig, write_index
from .card import card_files
from .config import ConfigError, config_to_dict
from .io import WeightsError, atomic_directory, atomic_write_bytes, check_state_dict, read_bounded, save_safetensors
from .modeling import CONFIG_NAME, WEIGHTS_NAME, hub_snapshot, looks_like_hub_id, named_model_dir
from .official import (
    FROM_CONFIG,
    RELEASE_REPO,
    convert_config,
    convert_state_dict,
    load_official_weights,
    official_name,
    release_provenance,
)
from .registry import TOKENIZER as TOKENIZER_KIND

TEXT_ENCODER = "amd/AMD-OLMo-1B"
TEXT_MAX_LENGTH = 128
IMAGE_SIZE = 512  # the release's scripts default to --image_size 512
# The release's networks, binlat kind -> release_formats.ReleaseFormat (part name, file, renames, sampling defaults).
FORMATS = {kind: registry.release_format(kind) for kind in registry.release_kinds()}
GENERATOR_KINDS = tuple(k for k in FORMATS if k != TOKENIZER_KIND)
# The release's sampling defaults (its test scripts'), in binlat's setting names, per generator kind.
SAMPLING = {kind: FORMATS[kind].sampling for kind in GENERATOR_KINDS}
# Architectures in the release's own key names. The tokenizer is the release's bae_config.py: patch 16, 12 + 16
# blocks, 2x2 down- and up-sampling after block 7; it decodes with set_scale(RELEASE_SCALE) (no "scale" key here,
# so official.convert_config applies that rule). The generators are built in test_diff.py / test_ar.py with 16
# heads x 128 and AMD-OLMo-1B's depth (16) and width (2048). Token count and bits per token (num_latent_tkns,
# codebook_size, num_img_tkns, in_channels) are read from the weights.
TOKENIZER = {
    "in_channels": 3,
    "encoder_layers": 12,
    "encoder_head_dim": 64,
    "encoder_num_heads": 12,
    "patch_size": 16,
    "axes_dims_rope": [8, 28, 28],
    "downsample_idx": [7],
    "decoder_layers": 16,
    "decoder_head_dim": 64,
    "decoder_num_heads": 16,
    "upsample_idx": [7],
}
GENERATOR = {"num_layers": 16, "attention_head_dim": 128, "num_attention_heads": 16, "text_cond_dim": 2048}
PART = {kind: f.part for kind, f in FORMATS.items()}  # binlat kind -> --release-config section
ARCHITECTURE = {f.part: TOKENIZER if kind == TOKENIZER_KIND else GENERATOR for kind, f in FORMATS.items()}
STANDARD_FILES = {kind: f.file for kind, f in FORMATS.items()}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
DOWNLOAD = f"huggingface-cli download {RELEASE_REPO} --local-dir DIR"
# Part of the cache key: bump it when the conversion's output changes, so older cached bundles are not reused.
CONVERSION_VERSION = 2


# --- the release's architecture ---------------------------------------------------------------------------------
def read_release_config(value: str | Path | dict | None) -> dict[str, dict[str, Any]] | None:
    """--release-config: a dict, JSON text, or a JSON file, shaped {"bae": {...}, "diffusion": {...}, "ar": {...}}
    (any subset) in the release's key names; each section is laid over the built-in preset."""
    if value is None or isinstance(value, dict):
        data, source = value, "release config"
    else:
        text, source = str(value), "--release-config"
        if not text.lstrip().startswith("{"):
            source = text
            try:
                text = read_bounded(text, what="release config").decode("utf-8")
            except OSError as e:
                raise ConfigError(
                    f"--release-config {value}: cannot read ({e.strerror}); give a JSON file or JSON text"
                ) from None
        try:
            data = jsondepth.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except jsondepth.JSONNestingError as e:
            raise ConfigError(f"{source}: {e}") from None
    if data is None:
        return None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(
            f'{source}: expected a JSON object of objects, e.g. {{"bae": {{...}}, "diffusion": {{...}}, "ar": {{...}}}}'
        )
    unknown = sorted(set(data) - set(ARCHITECTURE))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; sections are {sorted(ARCHITECTURE)}")
    return data


def architecture(release_config: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    given = release_config or {}
    return {part: {**preset, **given.get(part, {})} for part, preset in ARCHITECTURE.items()}


def _blocks(keys: set[str], prefix: str) -> int | None:
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else None


def _shape_facts(kind: str, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """Architecture values the weights' shapes fix: official key -> (value, the tensor and shape that say so)."""
    facts: dict[str, tuple[int, str]] = {}

    def put(key: str, tensor: str, dim: int, how=lambda n: n) -> None:
        if tensor in state and state[tensor].dim() > dim:
            facts[key] = (how(state[tensor].shape[dim]), f"{tensor} has shape {tuple(state[tensor].shape)}")

    keys = set(state)
    if kind == TOKENIZER_KIND:
        put("in_channels", "encoder.patch_embedder.weight", 1)
        put("patch_size", "encoder.patch_embedder.weight", 2)
        put("num_latent_tkns", "encoder.latent_tokens", 1)
        put("codebook_size", "quantizer.proj.0.weight", 0)
        for side, width in (("encoder", "encoder.patch_embedder.weight"), ("decoder", "decoder.input_layer.1.weight")):
            put(f"{side}_head_dim", f"{side}.transformer_blocks.0.attn.norm_q.weight", 0)
            if f"{side}_head_dim" in facts:
                put(f"{side}_num_heads", width, 0, lambda n, s=side: n // facts[f"{s}_head_dim"][0])
            if (n := _blocks(keys, f"{side}.transformer_blocks.")) is not None:
                facts[f"{side}_layers"] = (n, f"{side}.transformer_blocks.* runs to block {n - 1}")
        return facts
    put("in_channels", "x_embedder.weight", 1)
    put("num_img_tkns", "transformer_blocks.0.pos_emb", 1, lambda n: n - FORMATS[kind].start_rows)
    put("text_cond_dim", "transformer_blocks.0.proj_cond.weight", 1)
    put("attention_head_dim", "transformer_blocks.0.attn.norm_q.weight", 0)
    if "attention_head_dim" in facts:
        put("num_attention_heads", "x_embedder.weight", 0, lambda n: n // facts["attention_head_dim"][0])
    if (n := _blocks(keys, "transformer_blocks.")) is not None:
        facts["num_layers"] = (n, f"transformer_blocks.* runs to block {n - 1}")
    return facts


def _part_config(kind: str, state: dict[str, torch.Tensor], official: dict[str, Any], path: Path, source: str):
    """The binlat config of one network: the preset's values, checked against the weights' shapes, with what
    only the weights say (token count, bits per token) filled in from them."""
    official = dict(official)
    for key, (value, evidence) in _shape_facts(kind, state).items():
        if key in official and official[key] != value:
            raise WeightsError(
                f"{path}: the weights have {key}={value} ({evidence}) but {source} says "
                f"{key}={official[key]}; pass --release-config for another architecture"
            )
        official[key] = value
    config = convert_config(kind, official, f"{source} [{PART[kind]}]", scale=FROM_CONFIG)
    if kind != TOKENIZER_KIND:  # the release feeds text-encoder layer i to block i, whatever encoder is used
        config = dataclasses.replace(config, text_layers=tuple(range(config.num_layers)))
    return config


# --- finding the networks in a download -------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """Weight files in the folder and its direct subfolders (hidden ones, like huggingface-cli's .cache, skipped)."""
    found = [
        p
        for pattern in ("*", "*/*")
        for p in folder.glob(pattern)
        if p.suffix in WEIGHT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found)


def _keys(path: Path) -> set[str]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors has its own error types for bad headers
            raise WeightsError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
    return set(load_official_weights(path))


def classify(keys: set[str]) -> str | None:
    """Which of the release's networks a state dict is, by names only the release uses (binlat's differ)."""
    return next((kind for kind, f in FORMATS.items() if f.recognise(keys)), None)


def looks_like_release(folder: Path) -> bool:
    """Cheap test, before any hashing: a release file name, a .pt, or a safetensors header with release keys."""
    for path in weight_files(folder):
        if path.relative_to(folder).as_posix() in STANDARD_FILES.values() or path.suffix != ".safetensors":
            return True
        try:
            if classify(_keys(path)):
                return True
        except WeightsError:
            continue
    return False


def find_release_files(folder: str | Path) -> dict[str, Path]:
    """kind -> file. Every weight file must be one of the release's networks: a damaged, foreign or unsafe one
    is refused, naming it, rather than skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; download the release with {DOWNLOAD}")
    found: dict[str, list[Path]] = {}
    for path in weight_files(folder):
        kind = classify(_keys(path))
        if kind is None:
            raise WeightsError(
                f"{path}: not one of the Instella-T2I networks (no tokenizer, diffusion or AR "
                f"parameter names); remove it from {folder}"
            )
        found.setdefault(kind, []).append(path)
    files = {}
    for kind, paths in found.items():
        standard = [p for p in paths if p.relative_to(folder).as_posix() == STANDARD_FILES[kind]]
        if len(paths) > 1 and not standard:
            raise WeightsError(
                f"{folder}: {len(paths)} {kind} checkpoints ({', '.join(p.name for p in paths)}); "
                f"keep one, or name it {STANDARD_FILES[kind]}"
            )
        files[kind] = (standard or paths)[0]
    if TOKENIZER_KIND not in files:
        raise WeightsError(
            f"{folder}: no tokenizer ({STANDARD_FILES[TOKENIZER_KIND]}) found; download the release with {DOWNLOAD}"
        )
    if not any(k in files for k in GENERATOR_KINDS):
        raise WeightsError(
            f"{folder}: no generator ({' or '.join(STANDARD_FILES[k] for k in GENERATOR_KINDS)}) "
            f"found; download the release with {DOWNLOAD}"
        )
    return files


# --- conversion -------------------------------------------------------------------------------------------------
def _write_part(
    kind: str,
    path: Path,
    official: dict[str, Any],
    source: str,
    out: Path,
    dtype: torch.dtype | None,
    allow_nonfinite: bool = False,
) -> Any:
    state = load_official_weights(path)
    config = _part_config(kind, state, official, path, source)
    converted = convert_state_dict(kind, state, config)
    with torch.device("meta"):  # only for the names and shapes: no memory, no initialisation
        model = registry.model_class(kind)(config)
    check_state_dict(
        model, converted, str(path), name=lambda k: official_name(kind, k, config), allow_nonfinite=allow_nonfinite
    )
    if dtype is not None:
        converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()}
    out.mkdir(parents=True)
    (out / CONFIG_NAME).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    save_safetensors(converted, out / WEIGHTS_NAME, metadata={"format": "pt"})
    return config


def convert_release(
    folder: str | Path,
    out: str | Path,
    release_config: dict | str | Path | None = None,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write a complete binlat bundle from a download of the release: the tokenizer, whichever generators the
    download holds, and model_index.json (text encoder, its length, the release's sampling defaults). `dtype`
    stores the weights in that precision. Nothing is written unless every part converts; non-float or non-finite
    weights are refused naming the tensor (`allow_nonfinite`: NaN/inf are converted as they are)."""
    folder, out = Path(folder), Path(out)
    given = read_release_config(release_config)
    source = "--release-config" if given else "the release preset"
    arch = architecture(given)
    files = find_release_files(folder)
    generators = tuple(k for k in GENERATOR_KINDS if k in files)
    with atomic_directory(out) as tmp:
        tok = _write_part(
            TOKENIZER_KIND,
            files[TOKENIZER_KIND],
            arch[PART[TOKENIZER_KIND]],
            source,
            tmp / TOKENIZER_KIND,
            dtype,
            allow_nonfinite,
        )
        for kind in generators:
            cfg = _write_part(kind, files[kind], arch[PART[kind]], source, tmp / kind, dtype, allow_nonfinite)
            if (cfg.num_tokens, cfg.num_bits) != (tok.num_tokens, tok.num_bits):
                raise WeightsError(
                    f"{files[kind]}: the {kind} generator makes {cfg.num_tokens} tokens x "
                    f"{cfg.num_bits} bits but the tokenizer ({files[TOKENIZER_KIND]}) reads "
                    f"{tok.num_tokens} x {tok.num_bits}; they are not from one release"
                )
        index = PipelineConfig(
            text_encoder=TEXT_ENCODER,
            text_max_length=TEXT_MAX_LENGTH,
            generators=generators,
            image_size=IMAGE_SIZE,
            sampling={k: SAMPLING[k] for k in generators},
            description=f"Instella-T2I release, converted from {folder.resolve()}",
        )
        write_index(tmp, index)
        # The model card: the release's data and license (binlat.official), no vocabulary (open-domain captions).
        for name, data in card_files(
            config_to_dict(index),
            config_to_dict(tok),
            {k: release_provenance(k) for k in (TOKENIZER_KIND, *generators)},
        ).items():
            (tmp / name).write_bytes(data)
    return out


# --- the converted copy in the Hugging Face cache ---------------------------------------------------------------
def _hf_home() -> Path:
    # Read at call time (huggingface_hub reads its constants once, at import).
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser()


def hub_cache() -> Path:
    return Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub").expanduser()


def cache_root() -> Path:
    """Where converted downloads live: binlat's folder in the Hugging Face assets cache (HF_ASSETS_CACHE, else
    HF_HOME/assets), the place huggingface_hub sets aside for files a library derives."""
    assets = os.environ.get("HF_ASSETS_CACHE") or _hf_home() / "assets"
    return Path(assets).expanduser() / "binlat" / "instella-t2i"


def file_sha256(path: Path, memo: dict[str, str]) -> str:
    """SHA-256 of the file; `memo` remembers it per (path, size, mtime, inode), so the gigabytes are hashed once."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if stamp not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        memo[stamp] = digest.hexdigest()
    return memo[stamp]


def cache_key(folder: Path, release_config: dict | None) -> str:
    root = cache_root()
    memo_path = root / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    digest = hashlib.sha256(f"binlat-release-conversion-{CONVERSION_VERSION}\n".encode())
    digest.update(json.dumps(release_config, sort_keys=True).encode() + b"\n")
    before = dict(memo)
    for path in weight_files(folder):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path, memo)}\n".encode())
    if memo != before:
        atomic_write_bytes(memo_path, json.dumps(memo, indent=1).encode())
    return digest.hexdigest()[:32]


def cached_bundle(folder: str | Path, release_config: dict | str | Path | None = None) -> Path:
    """The bundle converted from this download: made on first use, then found by the files' hashes."""
    folder = Path(folder)
    given = read_release_config(release_config)
    target = cache_root() / cache_key(folder, given)
    if not (target / INDEX_NAME).is_file():
        convert_release(folder, target, given)
    return target


def _download(repo: str) -> Path:
    """The cached snapshot; offline or without a network, a copy not in the cache fails at once (no retries)."""
    return hub_snapshot(repo, ["*.json", *(f"*{s}" for s in WEIGHT_SUFFIXES)], cache_dir=hub_cache())


def resolve_pipeline_dir(name_or_path: str | Path, release_config: dict | str | Path | None = None) -> Path:
    """A bundle directory as is; a release download (folder or Hub id) as its cached converted bundle."""
    path = Path(name_or_path)
    if not path.is_dir():
        path = named_model_dir(name_or_path) or path  # "default": the shipped bundle
    if not path.is_dir():
        if not looks_like_hub_id(name_or_path):
            raise FileNotFoundError(f"{name_or_path}: no such model directory")
        path = _download(str(name_or_path))
    if (path / INDEX_NAME).is_file():
        if release_config is not None:
            raise ValueError(
                f"{name_or_path} is a binlat bundle: a release config applies only to a download of the release"
            )
        return path
    if release_config is not None or looks_like_release(path):
        return cached_bundle(path, release_config)
    return path
