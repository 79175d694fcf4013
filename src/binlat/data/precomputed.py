"""Datasets encoded once into bits (and optionally text features), so generator training skips the tokenizer and
the language model at every step.

A precomputed folder holds `index.json` (sample count, shard size, tokenizer and text-encoder references, text
layers) and shards `shard-00000.safetensors` with `bits` uint8 [n, K, B], optionally `text` float16
[n, layers, L, D] and `text_mask` uint8 [n, L]; captions sit in each shard's metadata. `uncond.safetensors` holds
the empty prompt's features for prompt dropout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..io import WeightsError, atomic_write_bytes, load_safetensors, save_safetensors

INDEX = "index.json"


class PrecomputedDataset:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.index = json.loads((self.root / INDEX).read_text())
        except FileNotFoundError:
            raise ValueError(
                f"{self.root}: not a precomputed dataset (no {INDEX}); make one with binlat precompute"
            ) from None
        self.count, self.shard_size = int(self.index["count"]), int(self.index["shard_size"])
        self._shard: tuple[int, dict[str, torch.Tensor], list[str]] | None = None

    def describe(self) -> dict[str, Any]:
        """What a run reads: the folder's sample count and the data it was made from (captions are read lazily,
        shard by shard, so they are not counted here)."""
        return {
            "samples": self.count,
            "captioned": None,
            "captions": f"the ones stored at precompute time (from {self.index.get('data') or 'unknown data'})",
        }

    def __len__(self) -> int:
        return self.count

    @property
    def has_text(self) -> bool:
        return bool(self.index.get("text_layers"))

    def uncond(self) -> dict[str, torch.Tensor]:
        return load_safetensors(self.root / "uncond.safetensors")

    def _load(self, shard: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        if self._shard is None or self._shard[0] != shard:
            path = self.root / f"shard-{shard:05d}.safetensors"
            tensors = load_safetensors(path)
            try:
                with safe_open(str(path), framework="pt") as f:
                    captions = json.loads(f.metadata()["captions"])
            except (KeyError, json.JSONDecodeError) as e:
                raise WeightsError(f"{path}: shard metadata has no valid captions ({e})") from None
            self._shard = (shard, tensors, captions)
        return self._shard[1], self._shard[2]

    def sample(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        tensors, captions = self._load(index // self.shard_size)
        row = index % self.shard_size
        out: dict[str, Any] = {"bits": tensors["bits"][row], "caption": captions[row]}
        if "text" in tensors:
            out["text"], out["text_mask"] = tensors["text"][row], tensors["text_mask"][row]
        return out


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a network's weights (names, dtypes, shapes, values): which tokenizer made a set of bits."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def precompute(
    data: Any,
    tokenizer,
    out: str | Path,
    *,
    text_encoder=None,
    text_layers: list[int] | None = None,
    shard_size: int = 1024,
    batch_size: int = 32,
    max_samples: int | None = None,
    tokenizer_ref: str = "",
    data_spec: str = "",
    progress: bool = True,
) -> int:
    """Encode `data` (a binlat dataset; `data_spec` names it in the index) into a precomputed folder; returns the
    number of samples written. The index records the tokenizer's weights fingerprint, so a run whose tokenizer
    differs is refused instead of training on another tokenizer's bits."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .collate import collate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sized = hasattr(data, "__len__")
    limit = max_samples or None  # 0, like None, means the whole of a finite dataset
    if limit is None and not sized:  # max_samples=0 here was a TypeError from len()
        raise ValueError("this dataset is endless (e.g. shapes): pass max_samples")
    total = len(data) if limit is None else min(limit, len(data)) if sized else limit
    with_text = bool(text_encoder is not None and text_layers)
    pending: dict[str, Any] = {"captions": []}
    written, shard = 0, 0

    def write(rows: int) -> None:
        """Write the first `rows` pending samples as the next shard (every shard but the last is full)."""
        nonlocal shard
        tensors = {k: v[:rows] for k, v in pending.items() if k != "captions"}
        save_safetensors(
            tensors,
            out / f"shard-{shard:05d}.safetensors",
            metadata={"captions": json.dumps(pending["captions"][:rows])},
        )
        for k in list(pending):
            pending[k] = pending[k][rows:]
        shard += 1

    def add(name: str, value: torch.Tensor) -> None:
        pending[name] = value if name not in pending else torch.cat((pending[name], value))

    def text_of(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Padded (on the left, as everywhere) to the encoder's max length so every shard stacks.
        assert text_encoder is not None and text_layers  # called only when with_text
        feats = text_encoder(captions).select(text_layers)
        pad = text_encoder.max_length - feats.mask.shape[1]
        layers = torch.nn.functional.pad(torch.stack(feats.layers, 1).to(torch.float16), (0, 0, pad, 0))
        return layers, torch.nn.functional.pad(feats.mask, (pad, 0)).to(torch.uint8)

    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate)
    bar = tqdm(total=total, disable=not progress, desc="precompute")
    for batch in loader:
        take = min(len(batch["caption"]), total - written)
        captions = list(batch["caption"][:take])
        add("bits", tokenizer.encode(batch["image"][:take]).to(torch.uint8))
        pending["captions"] += captions
        if with_text:
            layers, mask = text_of(captions)
            add("text", layers)
            add("text_mask", mask)
        written += take
        bar.update(take)
        while len(pending["captions"]) >= shard_size:
            write(shard_size)
        if written >= total:
            break
    if pending["captions"]:
        write(len(pending["captions"]))
    if with_text:
        layers, mask = text_of([""])
        save_safetensors({"text": layers, "text_mask": mask}, out / "uncond.safetensors")
    index = {
        "count": written,
        "shard_size": shard_size,
        "data": data_spec,
        "tokenizer": tokenizer_ref,
        "tokenizer_sha256": weights_fingerprint(tokenizer),
        "num_tokens": tokenizer.config.num_tokens,
        "num_bits": tokenizer.config.num_bits,
        "text_encoder": text_encoder.name_or_path if with_text else None,
        "text_layers": list(text_layers) if with_text and text_layers else None,
        "text_max_length": text_encoder.max_length if with_text else None,
    }
    atomic_write_bytes(out / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return written
