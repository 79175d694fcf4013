"""Pipeline: prompt -> text encoder -> generator process -> bits -> tokenizer decoder -> PIL images.

A bundle directory holds `model_index.json` (PipelineConfig) and one model directory per part:
`tokenizer/`, and `diffusion/` and/or `ar/`. The text encoder is referenced by name or path, not copied. The format
is binlat.bundle's; a download of the Instella-T2I release is converted into a bundle by binlat.release.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import budget, modeling, registry
from .bundle import INDEX_NAME as INDEX_NAME  # re-exported: where Python callers found it before binlat.bundle
from .bundle import PipelineConfig, load_part_configs, read_index, write_index
from .generation import Generators, PipelineOutput, check_prompts, generator_keyword, to_pil, with_options
from .generators import GeneratorConfig
from .hardware import require_bf16
from .io import atomic_directory
from .processes.common import make_generators
from .release import resolve_pipeline_dir
from .sampling import BUILTIN_SAMPLING as BUILTIN_SAMPLING  # re-exported: where callers found it before
from .sampling import resolve as resolve_settings
from .text import TextEncoder, TextFeatures, text_layer_map
from .tokenizer import BinaryTokenizer, TokenizerConfig
from .validators import check_int, resolve_seed


class Pipeline:
    def __init__(
        self,
        tokenizer: BinaryTokenizer,
        text_encoder: TextEncoder,
        *,
        config: PipelineConfig | None = None,
        loaders: dict[str, tuple[GeneratorConfig, Callable[[], modeling.Network]]] | None = None,
        **generators: modeling.Network | None,
    ):
        """Generators by kind, e.g. `Pipeline(tokenizer, text_encoder, diffusion=net, ar=other)`. `loaders` maps a
        kind to its config and a function that loads it; such a generator is checked against the tokenizer and
        text encoder now and loaded on first use."""
        self.tokenizer, self.text_encoder = tokenizer.eval(), text_encoder
        for kind in list(generators) + list(loaders or {}):
            registry.generator(kind)  # an unknown kind is a ValueError naming the registered ones
        models = {k: g.eval() for k in registry.generator_kinds() if (g := generators.get(k)) is not None}
        loaders = {k: v for k, v in (loaders or {}).items() if k not in models}
        self._generator_configs = {k: m.config for k, m in models.items()} | {k: c for k, (c, _) in loaders.items()}
        if not self._generator_configs:
            raise ValueError("a pipeline needs at least one generator (diffusion or ar)")
        # What .to() and .compile() asked for, applied to a generator loaded later too.
        self._placement: dict[str, Any] = {}
        self._compiled = False
        self._size_warned: set[tuple[int, int]] = set()
        self._words_warned: set[str] = set()  # words outside the training vocabulary already named
        self.generators = Generators(models, {k: f for k, (_, f) in loaders.items()}, self._prepare)
        self.config = config or PipelineConfig(
            text_encoder=text_encoder.name_or_path,
            generators=tuple(self.generators),
            image_size=tokenizer.config.image_size,
        )
        for kind, cfg in self._generator_configs.items():
            self._check_generator(kind, cfg)

    # --- construction -------------------------------------------------------------------------------------
    def _prepare(self, kind: str, model: modeling.Network) -> modeling.Network:
        if model.config != self._generator_configs[kind]:
            raise ValueError(f"{kind} generator: the loaded config differs from the one checked at construction")
        model.eval()
        if self._placement:
            model.to(**self._placement)
        if self._compiled:
            model.forward = torch.compile(model.forward, dynamic=True)
        return model

    def _check_generator(self, kind: str, cfg: GeneratorConfig) -> None:
        tok = self.tokenizer.config
        if (cfg.num_tokens, cfg.num_bits) != (tok.num_tokens, tok.num_bits):
            raise ValueError(
                f"{kind} generator makes {cfg.num_tokens}x{cfg.num_bits} bits but the tokenizer "
                f"reads {tok.num_tokens}x{tok.num_bits}"
            )
        if cfg.text_dim != self.text_encoder.hidden_size:
            raise ValueError(
                f"{kind} generator expects text features of width {cfg.text_dim}, but text encoder "
                f"{self.text_encoder.name_or_path!r} gives {self.text_encoder.hidden_size}; "
                f"use the text encoder it was trained with"
            )
        layers = self.text_layers(kind)
        if max(layers) >= self.text_encoder.num_layers:
            raise ValueError(
                f"{kind} generator reads text layer {max(layers)}, but the text encoder has only "
                f"{self.text_encoder.num_layers}"
            )

    def text_layers(self, kind: str) -> list[int]:
        cfg = self._generator_configs[kind]
        if cfg.text_layers is not None:
            return list(cfg.text_layers)
        return text_layer_map(self.text_encoder.num_layers, cfg.num_layers)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        text_encoder: str | TextEncoder | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        release_config: dict[str, Any] | str | Path | None = None,
        allow_nonfinite: bool = False,
    ) -> Pipeline:
        """`path`: a bundle directory, a Hub id of one, or the Instella-T2I release (its download folder or
        `amd/Instella-T2I`), which is converted once into a cached bundle (binlat.release); `release_config`
        overrides the release's architecture as `convert-official --release-config` does. Generators are loaded
        on first use. Non-float or non-finite weights are refused (WeightsError naming the tensor) when each part
        loads; `allow_nonfinite=True` loads NaN and infinite values anyway."""
        directory = resolve_pipeline_dir(path, release_config)
        config = read_index(directory)
        if dtype == torch.bfloat16:
            require_bf16(device, "bfloat16 generation", fix="load in float32 (dtype=None)")
        configs = load_part_configs(directory, config, dtype)
        networks = {k: registry.generator(k).network for k in config.generators}
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = TextEncoder(
                text_encoder or config.text_encoder, max_length=config.text_max_length, device=device
            )
        tokenizer = BinaryTokenizer.from_pretrained(
            directory / "tokenizer", device=device, dtype=dtype, allow_nonfinite=allow_nonfinite
        )
        loaders: dict[str, tuple[GeneratorConfig, Callable[[], modeling.Network]]] = {
            k: (
                configs[k],
                functools.partial(
                    network.from_pretrained, directory / k, device=device, dtype=dtype, allow_nonfinite=allow_nonfinite
                ),
            )
            for k, network in networks.items()
        }
        return cls(tokenizer, text_encoder, config=config, loaders=loaders)

    def save_pretrained(
        self, path: str | Path, dtype: torch.dtype | None = None, files: Mapping[str, bytes] | None = None
    ) -> Path:
        """Write the bundle; `dtype` (e.g. torch.float16) stores the weights in that precision. `files` (path in
        the bundle -> bytes, e.g. binlat.card's README.md and provenance) are written in the same atomic write."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            write_index(tmp, replace(self.config, generators=tuple(self.generators)))
            self.tokenizer.save_pretrained(tmp / "tokenizer", dtype=dtype)
            for kind in self.generators:  # a generator not loaded yet is loaded to be written
                self.generators[kind].save_pretrained(tmp / kind, dtype=dtype)
            for name, data in (files or {}).items():
                (tmp / name).write_bytes(data)
        return path

    @classmethod
    def random_tiny(cls, seed: int = 0, text_encoder: TextEncoder | None = None) -> Pipeline:
        """A freshly initialised tiny bundle (64 px, 16 tokens x 32 bits), for trying the machinery out."""
        text_encoder = text_encoder or TextEncoder()
        tok = TokenizerConfig(
            patch_size=8,
            num_tokens=16,
            num_bits=32,
            encoder_layers=2,
            encoder_heads=2,
            encoder_head_dim=32,
            decoder_layers=2,
            decoder_heads=2,
            decoder_head_dim=32,
            rope_axes_dims=(8, 12, 12),
            downsample_after=(0,),
            upsample_after=(0,),
            image_size=64,
        )
        shared = dict(  # every kind's network at the same size, each with its own options at their defaults
            num_bits=32,
            num_tokens=16,
            num_layers=2,
            num_heads=2,
            head_dim=32,
            text_dim=text_encoder.hidden_size,
            text_layers=tuple(text_layer_map(text_encoder.num_layers, 2)),
        )
        kinds = registry.generator_kinds()
        with torch.random.fork_rng():  # built in this order, so the weights depend only on the seed
            torch.manual_seed(seed)
            tokenizer = BinaryTokenizer(tok)
            networks = {k: registry.generator(k).network(registry.generator(k).config(**shared)) for k in kinds}
        config = PipelineConfig(
            text_encoder=text_encoder.name_or_path,
            generators=kinds,
            image_size=64,
            trained=False,
            description="randomly initialised tiny model",
        )
        return cls(tokenizer, text_encoder, config=config, **networks)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the tokenizer and generators (the text encoder keeps its own dtype; the networks cast its
        features). bfloat16 is about 1.6x faster for a whole image on a CPU with bf16 matmuls (`binlat bench`,
        table 7) but changes a few percent of the sampled bits: it is opt-in, and refused (ValueError) where the
        device would emulate it (binlat.hardware)."""
        if dtype == torch.bfloat16:
            require_bf16(device or next(self.tokenizer.parameters()).device, "bfloat16 generation", fix="keep float32")
        self.tokenizer.to(device=device, dtype=dtype)
        self._placement |= {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for model in self.generators.loaded().values():
            model.to(device=device, dtype=dtype)
        return self

    def compile(self) -> Pipeline:
        """Opt in to torch.compile for the generators and the tokenizer decoder (the first call pays the compile
        time; the fused elementwise work then runs faster on CPU). Compiled kernels may round differently, so rare
        bits can differ from eager mode for the same seed."""
        self._compiled = True
        for model in self.generators.loaded().values():
            model.forward = torch.compile(model.forward, dynamic=True)
        self.tokenizer.decoder.forward = torch.compile(  # type: ignore[method-assign]  # patched in place on purpose
            self.tokenizer.decoder.forward, dynamic=True
        )
        return self

    def process(self, kind: str):
        """The sampling process of generator `kind`; after .compile(), its compiled decoding where it has one (the
        AR step: decode="compiled", since its default static step does not go through the compiled forward)."""
        process = registry.generator(kind).sampler(self.generators[kind].config)
        if self._compiled and getattr(process, "decode", None) == "static":
            process = replace(process, decode="compiled")
        return process

    # --- generation ---------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> tuple[TextFeatures, TextFeatures]:
        """Features of the prompts and of the empty prompt (for guidance), each prompt encoded once."""
        features = self.text_encoder(list(prompts) + [""])
        n = len(prompts)
        return features.index(list(range(n))), features.index([n])

    @generator_keyword
    def check_work(self, kind: str | None, batch: int, height: int, width: int, kept_images: int = 1) -> None:
        """Refuse (budget.MemoryBudgetError, one line) a request whose estimated memory exceeds the limit: one batch
        through generator `kind` (None: the costliest of the pipeline's), one image through the tokenizer decoder,
        and the images kept. Warns once per size when a side is beyond the size the tokenizer was trained at."""
        tok = self.tokenizer.config
        kinds = [kind] if kind is not None else list(self._generator_configs)
        estimate = max(
            budget.generation_bytes(
                tok,
                self._generator_configs[k],
                batch=batch,
                height=height,
                width=width,
                text_len=self.text_encoder.max_length,
                text_layers=len(self.text_layers(k)),
                kept_images=kept_images,
            )
            for k in kinds
        )
        budget.check(
            estimate,
            f"{kept_images} image(s) of {height}x{width} in batches of {batch}",
            "ask for a smaller --size or --batch-size (fewer images per request)",
        )
        if max(height, width) > tok.image_size and (height, width) not in self._size_warned:
            self._size_warned.add((height, width))
            warnings.warn(
                f"{height}x{width} is beyond the {tok.image_size} px the tokenizer was trained at: "
                f"expect poorer images",
                UserWarning,
                stacklevel=3,
            )

    @generator_keyword
    def warn_vocabulary(
        self, prompts: str | Sequence[str], kind: str = "diffusion", warn: Callable[[str], None] | None = None
    ) -> list[str]:
        """The words of `prompts` outside generator `kind`'s training vocabulary (config.vocabulary) not named before by
        this pipeline; when there are any, one message naming them goes to `warn` (default: a UserWarning). Every
        generation calls it, so a run names each unknown word once. A generator without a vocabulary (bundles made
        before cards, open-domain captions) checks nothing."""
        from .data.vocabulary import unknown_words, unknown_words_message

        vocabulary = self.config.vocabulary.get(kind)
        if not vocabulary:
            return []
        prompts = [prompts] if isinstance(prompts, str) else prompts
        new = [w for w in unknown_words(prompts, vocabulary) if w not in self._words_warned]
        if new:
            self._words_warned.update(new)
            message = unknown_words_message(new, vocabulary)
            if warn is None:
                warnings.warn(message, UserWarning, stacklevel=3)
            else:
                warn(message)
        return new

    @generator_keyword
    def sampling_settings(self, kind: str = "diffusion", **given: Any) -> dict[str, Any]:
        """The complete, checked settings a call uses, every registered setting (binlat.sampling): its own
        (non-None) arguments, else the bundle's `sampling` for generator `kind`, else the built-ins. Every entry
        point (Python, CLI, server, eval) resolves through here. An unknown name is a TypeError."""
        if kind not in registry.generator_kinds():
            raise ValueError(f"kind must be one of the generator kinds {registry.generator_kinds()}, got {kind!r}")
        return resolve_settings(kind, self.config.sampling.get(kind, {}), given)

    @torch.inference_mode()
    def decode(self, bits: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """Bits [N, K, B] -> N PIL images of height x width, each decoded alone: on some CPUs a batch's shape
        changes float rounding, and a pixel near a rounding edge would then differ from the same bits decoded
        alone (or in another batch). Per-image decoding costs little (64 images at 64 px: no slower than one
        batch of 64 on an AMD EPYC)."""
        device = next(self.tokenizer.parameters()).device
        return [to_pil(self.tokenizer.decode(b[None].to(device), height, width))[0] for b in bits]

    def _start(
        self,
        keep_all: bool,
        prompts: str | Sequence[str],
        kind: str,
        /,
        *,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        return_bits: bool = False,
        progress: bool = True,
        **settings: Any,
    ) -> Iterator[PipelineOutput]:
        """The options __call__ and batches share, declared once here (help() shows them on both), checked before
        the first batch is asked for. `keep_all`: the memory estimate counts every image (__call__ keeps them all)
        instead of one batch's."""
        prompts = check_prompts(prompts)
        if kind not in self.generators:
            raise ValueError(f"generator {kind!r} is not in this model; available: {sorted(self.generators)}")
        settings = self.sampling_settings(kind, **settings)
        self.warn_vocabulary(prompts, kind)
        check_int("batch size", batch_size, 1)
        height = self.config.image_size if height is None else height  # 0 is a bad size, not "default"
        width = height if width is None else width
        self.tokenizer.check_size(height, width)
        batch = min(batch_size, len(prompts))
        self.check_work(kind, batch, height, width, kept_images=len(prompts) if keep_all else batch)
        base = resolve_seed(seed, len(prompts))
        return self._batches(prompts, kind, settings, base, height, width, batch_size, return_bits, progress)

    @generator_keyword
    @with_options(_start)
    def __call__(self, prompts: str | Sequence[str], kind: str = "diffusion", **options: Any) -> PipelineOutput:
        """Generate one image per prompt with generator `kind`. Image i uses seed `seed + i`, so it can be
        regenerated alone. height and width default to the bundle's image size; `return_bits` adds the bits
        [N, K, B]. The other keywords are the sampling settings (num_steps, guidance_scale, temperature, rho,
        protocol and any a registered kind adds: the fields of its process's Settings, binlat.sampling); one left
        out or None takes the bundle's tuned value (`config.sampling`), else the built-in one."""
        parts = list(self._start(True, prompts, kind, **options))
        chunks = [p.bits for p in parts if p.bits is not None]  # every part's, as with_bits=True asked
        return PipelineOutput(
            images=[im for p in parts for im in p.images],
            seeds=[s for p in parts for s in p.seeds],
            prompts=[t for p in parts for t in p.prompts],
            bits=torch.cat(chunks) if len(chunks) == len(parts) else None,
        )

    @generator_keyword
    @with_options(_start)
    def batches(
        self, prompts: str | Sequence[str], kind: str = "diffusion", **options: Any
    ) -> Iterator[PipelineOutput]:
        """What __call__ makes, with the same arguments, one PipelineOutput per batch of `batch_size` prompts as soon
        as it is decoded (for writing images as they come). Every argument is checked here, before the first batch
        is asked for, and the memory a batch needs is estimated (binlat.budget): a request that would not fit is a
        MemoryBudgetError. Prompts are encoded batch by batch, so their number costs time, not memory."""
        return self._start(False, prompts, kind, **options)

    def _batches(
        self,
        prompts: list[str],
        kind: str,
        settings: dict[str, Any],
        base: int,
        height: int,
        width: int,
        batch_size: int,
        return_bits: bool,
        progress: bool,
    ) -> Iterator[PipelineOutput]:
        seeds = [base + i for i in range(len(prompts))]
        # Text is encoded batch by batch (20,000 prompts at once once took 8 GB); the empty prompt and the previous
        # batch's prompts are remembered, so a prompt repeated across neighbouring batches is encoded once.
        known: dict[str, TextFeatures] = {}
        layers = self.text_layers(kind)
        network = self.generators[kind]
        process, sampling = self.process(kind), registry.generator(kind).sampling(settings)
        device = next(network.parameters()).device
        for start in range(0, len(prompts), batch_size):
            rows = list(range(start, min(start + batch_size, len(prompts))))
            batch = [prompts[i] for i in rows]
            new = [p for p in dict.fromkeys(batch + [""]) if p not in known]
            if new:
                features = self.text_encoder(new)
                known = {p: known[p] for p in batch + [""] if p in known}
                known |= {p: features.index([j]) for j, p in enumerate(new)}
            joint = TextFeatures.cat([known[p] for p in batch + [""]]).select(layers)  # one length for both
            cond, uncond = joint.index(list(range(len(batch)))), joint.index([len(batch)])
            known = {p: known[p] for p in batch + [""]}
            generators = make_generators([seeds[i] for i in rows], device)
            bits = process.sample(network, cond, uncond, generators, sampling, progress=progress)
            yield PipelineOutput(
                images=self.decode(bits, height, width),
                seeds=[seeds[i] for i in rows],
                prompts=[prompts[i] for i in rows],
                bits=bits.to(torch.uint8).cpu() if return_bits else None,
            )


def default_model_dir() -> Path | None:
    """$BINLAT_MODEL, else the bundle shipped in the repository (models/default), else None (binlat.modeling's)."""
    return modeling.default_model_dir()
