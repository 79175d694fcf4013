"""The bundle format that binlat.pipeline loads and saves, binlat.release converts the release into and binlat.card
rewrites: a directory with `model_index.json` (a PipelineConfig) and one model directory per part, `tokenizer/` and
`diffusion/` and/or `ar/`. The text encoder is referenced by name or path, not copied.

The index's name, its config, the reading and writing of the file and the reading of the parts' configs (with
what the bundle will cost in memory) live here, below all three, so that none of them imports another for the
format. The settings its `sampling` may give are binlat.sampling's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import budget, jsondepth, registry
from .config import ConfigError, config_from_dict, config_to_dict
from .io import atomic_write_bytes, read_bounded
from .sampling import check as check_settings
from .sampling import names as setting_names
from .sampling import unknown as unknown_settings
from .text import DEFAULT_TEXT_ENCODER
from .tokenizer import BinaryTokenizer

INDEX_NAME = "model_index.json"


def check_vocabulary(vocabulary: Any, where: str = "vocabulary") -> None:
    """A vocabulary is {"source": text, "words": [text, ...]}; anything else is a ValueError naming `where`."""
    ok = (
        isinstance(vocabulary, dict)
        and set(vocabulary) == {"source", "words"}
        and isinstance(vocabulary["source"], str)
        and isinstance(vocabulary["words"], list)
        and all(isinstance(w, str) for w in vocabulary["words"])
    )
    if not ok:
        raise ValueError(f'{where}: expected {{"source": TEXT, "words": [WORD, ...]}}, got {vocabulary!r:.80}')


@dataclass
class PipelineConfig:
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_max_length: int = 128
    generators: tuple[str, ...] = ("diffusion",)
    image_size: int = 512
    trained: bool = True  # False marks a randomly initialised bundle (its images are noise)
    description: str = ""
    # The sampling settings this model was tuned for, per generator, e.g. {"diffusion": {"guidance_scale": 3.0}};
    # a call's own arguments win, and keys left out take the built-in defaults (binlat.sampling.builtin).
    sampling: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The words of each generator's training captions, {"ar": {"source": "shapes", "words": [...]}} (binlat.card,
    # from the parts' provenance): a prompt with other words is warned about. A generator left out checks nothing.
    vocabulary: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.generators = tuple(self.generators)
        kinds = registry.generator_kinds()
        bad = [g for g in self.generators if g not in kinds]
        if bad or not self.generators:
            raise ValueError(f"generators must name one or both of {kinds}, got {list(self.generators)}")
        if not isinstance(self.sampling, dict):
            raise ValueError(
                f"sampling must be an object of generator kinds {kinds} mapping to settings, got {self.sampling!r:.80}"
            )
        for kind, settings in self.sampling.items():
            if kind not in kinds or not isinstance(settings, dict):
                raise ValueError(
                    f"sampling: keys are generator kinds {kinds} mapping to settings, got {kind!r}: {settings!r}"
                )
            unknown = unknown_settings(settings)
            if unknown:
                raise ValueError(f"sampling.{kind}: unknown setting(s) {unknown}; valid: {setting_names()}")
            check_settings(settings, kind)
        for kind, vocabulary in self.vocabulary.items():
            if kind not in kinds:
                raise ValueError(f"vocabulary: keys are generator kinds {kinds}, got {kind!r}")
            check_vocabulary(vocabulary, f"vocabulary.{kind}")


def index_bytes(config: PipelineConfig) -> bytes:
    """The bytes of model_index.json for `config`: its JSON, indented by two, with a final newline."""
    return (json.dumps(config_to_dict(config), indent=2) + "\n").encode()


def write_index(directory: str | Path, config: PipelineConfig) -> Path:
    """Write `config` as the bundle's model_index.json (atomically: a reader sees the old index or the new one)."""
    path = Path(directory) / INDEX_NAME
    atomic_write_bytes(path, index_bytes(config))
    return path


def read_index(directory: str | Path) -> PipelineConfig:
    """The PipelineConfig of a bundle directory, read and checked strictly: a missing index is FileNotFoundError;
    invalid JSON, nesting too deep or a field that is not a PipelineConfig's is a ConfigError naming the file."""
    index = Path(directory) / INDEX_NAME
    if not index.exists():  # one that is not a regular file is refused by read_bounded, naming what it is
        raise FileNotFoundError(
            f"{directory}: missing {INDEX_NAME}; not a binlat pipeline directory "
            f"(a single model directory loads with its model class instead)"
        )
    try:
        data = jsondepth.loads(read_bounded(index, what="bundle index").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{index}: not valid JSON ({e})") from None
    except jsondepth.JSONNestingError as e:
        raise ConfigError(f"{index}: {e}") from None
    return config_from_dict(PipelineConfig, data, str(index))


def load_part_configs(directory: str | Path, config: PipelineConfig, dtype: Any = None) -> dict[str, Any]:
    """The configs of a bundle's generators (`<kind>/config.json`), read strictly, after the whole bundle has been
    measured against the memory limit (binlat.budget) before any part is built: its networks in `dtype`, and one
    image made at its own image_size. A bundle that would not fit is a MemoryBudgetError naming it."""
    directory = Path(directory)
    networks = {k: registry.generator(k).network for k in config.generators}
    configs = {k: network.read_config(directory / k) for k, network in networks.items()}
    tok_config = BinaryTokenizer.read_config(directory / "tokenizer")
    total = sum(
        budget.check_network(network, c, str(directory / part), dtype)
        for part, network, c in [("tokenizer", BinaryTokenizer, tok_config)]
        + [(k, networks[k], configs[k]) for k in configs]
    )
    work = max(
        budget.generation_bytes(
            tok_config,
            c,
            batch=1,
            height=config.image_size,
            width=config.image_size,
            text_len=config.text_max_length,
            text_layers=c.num_layers,
            kept_images=1,
        )
        for c in configs.values()
    )
    budget.check(
        total + work,
        f"{directory}: this bundle (its networks, and one image at its image_size {config.image_size})",
        "check its configs and model_index.json's image_size",
    )
    return configs
