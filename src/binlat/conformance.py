"""Run a conformance case (official config + weights + inputs) through binlat and compare with the stored outputs.

The expected outputs are read only for the final comparison; every output is computed from the inputs alone."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import registry
from .io import load_safetensors
from .official import convert_official

TOLERANCE = 1e-4


@dataclass
class Comparison:
    name: str
    max_abs_error: float
    tolerance: float  # 0 means exact match required (bits)

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance


def case_kind(case_dir: Path) -> str:
    """A case's network, from its folder's name: each release format has its prefix (tok_, diff_, ar_)."""
    prefixes = {registry.release_format(kind).case_prefix: kind for kind in registry.release_kinds()}
    for prefix, kind in prefixes.items():
        if case_dir.name.startswith(prefix):
            return kind
    raise ValueError(
        f"{case_dir}: cannot tell the network from the name; case folders start with {', '.join(prefixes)}"
    )


def _compute(kind: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return registry.release_format(kind).outputs(model, inputs)


def run_case(case_dir: str | Path) -> list[Comparison]:
    case_dir = Path(case_dir)
    kind = case_kind(case_dir)
    for name in ("config.json", "weights.safetensors", "io.safetensors"):
        if not (case_dir / name).is_file():
            raise FileNotFoundError(f"{case_dir}: missing {name}")
    io = load_safetensors(case_dir / "io.safetensors")
    input_names = set(registry.release_format(kind).case_inputs) | {k for k in io if k.startswith("llm_features.")}
    inputs = {k: io[k] for k in input_names if k in io}
    expected = {k: v for k, v in io.items() if k not in input_names}
    with tempfile.TemporaryDirectory() as tmp:
        # Through the same path a user takes: official files -> binlat directory -> from_pretrained.
        model_dir = convert_official(
            kind, case_dir / "config.json", case_dir / "weights.safetensors", Path(tmp) / "model"
        )
        model = registry.model_class(kind).from_pretrained(model_dir)
    with torch.inference_mode():
        outputs = _compute(kind, model, inputs)
    comparisons = []
    for name, want in sorted(expected.items()):
        if name not in outputs:
            raise ValueError(f"{case_dir}: io.safetensors has an output {name!r} that binlat does not know")
        got = outputs[name].float()
        if got.shape != want.shape:
            raise ValueError(f"{case_dir}: output {name!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        err = (got - want).abs().max().item() if got.numel() else 0.0
        comparisons.append(Comparison(name, err, 0.0 if name.endswith("bits") else TOLERANCE))
    return comparisons
