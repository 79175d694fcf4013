"""Run a conformance case (official config + weights + inputs) through binlat and compare with the stored outputs.

The expected outputs are read only for the final comparison; every output is computed from the inputs alone."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import load_safetensors
from .official import MODEL_CLASSES, convert_official

TOLERANCE = 1e-4
_INPUTS = {
    "tokenizer": ("images", "random_bits"),
    "diffusion": ("x_t", "text_mask", "timestep"),
    "ar": ("prefix_bits", "text_mask"),
}
_KIND_BY_PREFIX = {"tok_": "tokenizer", "diff_": "diffusion", "ar_": "ar"}


@dataclass
class Comparison:
    name: str
    max_abs_error: float
    tolerance: float  # 0 means exact match required (bits)

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance


def case_kind(case_dir: Path) -> str:
    for prefix, kind in _KIND_BY_PREFIX.items():
        if case_dir.name.startswith(prefix):
            return kind
    raise ValueError(f"{case_dir}: cannot tell the network from the name; case folders start with "
                     f"{', '.join(_KIND_BY_PREFIX)}")


def _compute(kind: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if kind == "tokenizer":
        images = inputs["images"]
        h, w = images.shape[-2:]
        encoder_out = model.encoder(images, model.scale)
        logits = model.quantizer.to_logits(encoder_out)
        bits = (torch.sigmoid(logits) > 0.5).float()
        return {"encoder_out": encoder_out, "logits": logits, "bits": bits,
                "decoded": model.decode(bits, h, w), "decoded_random": model.decode(inputs["random_bits"], h, w),
                "reconstruction": model(images).reconstruction}
    text = [inputs[f"llm_features.{i}"] for i in range(len(model.blocks))]
    mask = inputs["text_mask"] > 0.5
    if kind == "diffusion":
        return {"out": model(inputs["x_t"], inputs["timestep"], text, mask)}
    return {"out_first": model(None, text, mask), "out_prefix": model(inputs["prefix_bits"], text, mask)}


def run_case(case_dir: str | Path) -> list[Comparison]:
    case_dir = Path(case_dir)
    kind = case_kind(case_dir)
    for name in ("config.json", "weights.safetensors", "io.safetensors"):
        if not (case_dir / name).is_file():
            raise FileNotFoundError(f"{case_dir}: missing {name}")
    io = load_safetensors(case_dir / "io.safetensors")
    input_names = set(_INPUTS[kind]) | {k for k in io if k.startswith("llm_features.")}
    inputs = {k: io[k] for k in input_names if k in io}
    expected = {k: v for k, v in io.items() if k not in input_names}
    with tempfile.TemporaryDirectory() as tmp:
        # Through the same path a user takes: official files -> binlat directory -> from_pretrained.
        model_dir = convert_official(kind, case_dir / "config.json", case_dir / "weights.safetensors",
                                     Path(tmp) / "model")
        model = MODEL_CLASSES[kind].from_pretrained(model_dir)
    with torch.inference_mode():
        outputs = _compute(kind, model, inputs)
    comparisons = []
    for name, want in sorted(expected.items()):
        if name not in outputs:
            raise ValueError(f"{case_dir}: io.safetensors has an output {name!r} that binlat does not know")
        got = outputs[name].float()
        if got.shape != want.shape:
            raise ValueError(f"{case_dir}: output {name!r} has shape {tuple(got.shape)}, "
                             f"expected {tuple(want.shape)}")
        err = (got - want).abs().max().item() if got.numel() else 0.0
        comparisons.append(Comparison(name, err, 0.0 if name.endswith("bits") else TOLERANCE))
    return comparisons
