"""The generator kinds: for each, its network class (and so its config class) and its process.

This is the one place that knows which generators exist. The pipeline, the trainer, the converter, editing, the
server and the evaluations look a kind up here and then work through the common interfaces: a network built from
its config, and a process with `Settings`, `sample` and `loss` (binlat.processes.common). A new generator is its
own network and process files plus one `register` call; `tests/test_registry.py` registers toy ones. The fields of
its process's `Settings` are its sampling settings: binlat.sampling makes them keyword arguments, CLI options and
HTTP fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .generators import ARTransformer, DiffusionTransformer
from .processes import ARDecoding, BernoulliDiffusion
from .tokenizer import BinaryTokenizer

TOKENIZER = "tokenizer"  # the one model kind that is not a generator


@dataclass(frozen=True)
class ReleaseFormat:
    """How the Instella-T2I release stores one network: binlat.official converts it, binlat.release finds it in a
    download, binlat.conformance runs its golden cases."""

    part: str  # its section of --release-config (the release's name for it)
    file: str  # its file in a download of the release
    renames: tuple[tuple[str, str], ...]  # release parameter names -> binlat's (regex, replacement), in order
    dropped: str | None  # parameters the release keeps but never uses at inference (regex)
    recognise: Callable[[set[str]], bool]  # whether a state dict's key names are this network's
    case_prefix: str  # its conformance case folders start with this
    case_inputs: tuple[str, ...]  # a case's inputs besides the text features (llm_features.<i>)
    outputs: Callable[[Any, dict], dict]  # (model, inputs) -> the outputs a case compares
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)  # the release's sampling defaults
    start_rows: int = 0  # pos_emb rows before the first image token (AR: the start token)


@dataclass(frozen=True)
class GeneratorKind:
    name: str
    network: type  # an nn.Module taking one config (`network.config_class`), with from_pretrained/save_pretrained
    process: type  # its `Settings` dataclass, sample(...), loss(...); optional operations such as `redraw`
    sampler: Callable[[Any], Any]  # the network's config -> the process that samples it
    # A run's generator options (train.config.GeneratorTraining) and the network's config -> its process
    trainer: Callable[[Any, Any], Any]
    release: ReleaseFormat | None = None  # how the Instella-T2I release stores it, if it has one

    @property
    def config(self) -> type:
        return self.network.config_class

    @property
    def settings(self) -> type:
        return self.process.Settings

    def uses(self, setting: str) -> bool:
        """Whether sampling reads this setting (e.g. "num_steps"); the others are accepted and ignored."""
        return setting in {f.name for f in dataclasses.fields(self.settings)}

    def sampling(self, settings: Mapping[str, Any]) -> Any:
        """The kind's settings object from a settings dict (Pipeline.sampling_settings): the entries it reads; a
        field the dict leaves out keeps its default."""
        return self.settings(
            **{f.name: settings[f.name] for f in dataclasses.fields(self.settings) if f.name in settings}
        )

    def can(self, operation: str) -> bool:
        """Whether the process offers `operation` (e.g. "redraw" for editing, "continue_from" for continuation)."""
        return callable(getattr(self.process, operation, None))


_KINDS: dict[str, GeneratorKind] = {}


def register(kind: GeneratorKind) -> GeneratorKind:
    if kind.name in _KINDS or kind.name == TOKENIZER:
        raise ValueError(f"generator kind {kind.name!r} is already taken")
    # A default is the setting's built-in value (binlat.sampling): a call may leave any setting out.
    missing = dataclasses.MISSING
    bare = [f.name for f in dataclasses.fields(kind.settings) if f.default is missing and f.default_factory is missing]
    if bare:
        raise ValueError(f"generator kind {kind.name!r}: its Settings fields {bare} need a default")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    del _KINDS[name]


def generator_kinds() -> tuple[str, ...]:
    """Registered generators, in registration order (the order bundles, listings and menus use)."""
    return tuple(_KINDS)


def model_kinds() -> tuple[str, ...]:
    """Everything `binlat train`, `convert-official` and the conformance cases can name: the tokenizer first."""
    return (TOKENIZER, *_KINDS)


def generator(name: str) -> GeneratorKind:
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown generator kind {name!r}; choose one of {generator_kinds()}") from None


def kinds_that_can(operation: str) -> list[str]:
    return [k for k, spec in _KINDS.items() if spec.can(operation)]


def release_kinds() -> tuple[str, ...]:
    """The model kinds the release has (binlat.official converts them)."""
    return tuple(k for k in model_kinds() if k == TOKENIZER or _KINDS[k].release is not None)


def release_format(kind: str) -> ReleaseFormat:
    if kind not in release_kinds():
        raise ValueError(f"unknown kind {kind!r}; choose one of {release_kinds()}")
    return TOKENIZER_RELEASE if kind == TOKENIZER else _KINDS[kind].release


def model_class(kind: str) -> type:
    return BinaryTokenizer if kind == TOKENIZER else generator(kind).network


class _ModelClasses(Mapping):
    """kind -> model class, for the tokenizer and every registered generator."""

    def __getitem__(self, kind: str) -> type:
        if kind not in model_kinds():
            raise KeyError(kind)
        return model_class(kind)

    def __iter__(self) -> Iterator[str]:
        return iter(model_kinds())

    def __len__(self) -> int:
        return len(model_kinds())


MODEL_CLASSES: Mapping[str, type] = _ModelClasses()


# --- the release's networks --------------------------------------------------------------------------------------
PRENORM_RENAMES = ((r"\.input_layernorm\.", ".norm1."), (r"\.post_attention_layernorm\.", ".norm2."))


def _text(model: Any, inputs: dict) -> tuple[list, Any]:
    return [inputs[f"llm_features.{i}"] for i in range(len(model.blocks))], inputs["text_mask"] > 0.5


def _tokenizer_outputs(model: Any, inputs: dict) -> dict:
    images = inputs["images"]
    h, w = images.shape[-2:]
    encoder_out = model.encoder(images, model.scale)
    logits = model.quantizer.to_logits(encoder_out)
    bits = (logits.sigmoid() > 0.5).float()
    return {
        "encoder_out": encoder_out,
        "logits": logits,
        "bits": bits,
        "decoded": model.decode(bits, h, w),
        "decoded_random": model.decode(inputs["random_bits"], h, w),
        "reconstruction": model(images).reconstruction,
    }


TOKENIZER_RELEASE = ReleaseFormat(
    part="bae",
    file="bae/model.safetensors",
    renames=PRENORM_RENAMES
    + (
        (r"\.mlp\.gate_proj\.", ".mlp.gate."),
        (r"\.mlp\.up_proj\.", ".mlp.up."),
        (r"\.mlp\.down_proj\.", ".mlp.down."),
        (r"^encoder\.patch_embedder\.", "encoder.patch_embed."),
        (r"^quantizer\.proj\.0\.", "quantizer.to_logits."),
        (r"^quantizer\.embed$", "quantizer.codebook"),
        (r"^decoder\.input_layer\.0\.", "decoder.norm_in."),
        (r"^decoder\.input_layer\.1\.", "decoder.proj_in."),
        (r"^decoder\.mask_tokens$", "decoder.mask_token"),
        (r"^to_pixel\.", "decoder.to_pixels."),
    ),
    dropped=r"(^|\.)repa",  # REPA projection heads, used only in training
    recognise=lambda keys: "encoder.latent_tokens" in keys and "quantizer.proj.0.weight" in keys,
    case_prefix="tok_",
    case_inputs=("images", "random_bits"),
    outputs=_tokenizer_outputs,
)

DIFFUSION_RELEASE = ReleaseFormat(
    part="diffusion",
    file="diffusion.pt",
    renames=(
        (r"^x_embedder\.", "x_embed."),
        (r"^time_embed\.linear_1\.", "t_embed.fc1."),
        (r"^time_embed\.linear_2\.", "t_embed.fc2."),
        (r"\.norm1\.linear\.", ".adaln.linear."),
        (r"\.proj_cond\.", ".text_proj."),
        (r"\.ff\.net\.0\.proj\.", ".mlp.fc1."),
        (r"\.ff\.net\.2\.", ".mlp.fc2."),
    ),
    dropped=None,
    recognise=lambda keys: "x_embedder.weight" in keys and any(k.endswith(".norm1.linear.weight") for k in keys),
    case_prefix="diff_",
    case_inputs=("x_t", "text_mask", "timestep"),
    outputs=lambda model, inputs: {"out": model(inputs["x_t"], inputs["timestep"], *_text(model, inputs))},
    # its test script's --cfg_scale 7.5 --temp 1.0 --rho 1.0 --num_steps 20 --sampling_protocal protocal_1
    sampling={"guidance_scale": 7.5, "temperature": 1.0, "rho": 1.0, "num_steps": 20, "protocol": 1},
)

AR_RELEASE = ReleaseFormat(
    part="ar",
    file="ar.pt",
    renames=PRENORM_RENAMES
    + (
        (r"^split_token$", "start_token"),
        (r"^x_embedder\.", "x_embed."),
        (r"\.proj_cond\.", ".text_proj."),
        (r"\.mlp\.net\.0\.proj\.", ".mlp.fc1."),
        (r"\.mlp\.net\.2\.", ".mlp.fc2."),
    ),
    dropped=r"^time_embed\.",  # a timestep embedding the AR model never uses
    recognise=lambda keys: "split_token" in keys and "x_embedder.weight" in keys,
    case_prefix="ar_",
    case_inputs=("prefix_bits", "text_mask"),
    outputs=lambda model, inputs: {
        "out_first": model(None, *_text(model, inputs)),
        "out_prefix": model(inputs["prefix_bits"], *_text(model, inputs)),
    },
    sampling={"guidance_scale": 7.5, "temperature": 1.0},
    start_rows=1,
)


# --- the generators ---------------------------------------------------------------------------------------------
register(
    GeneratorKind(
        "diffusion",
        DiffusionTransformer,
        BernoulliDiffusion,
        sampler=lambda config: BernoulliDiffusion(prediction=config.prediction, self_condition=config.self_condition),
        trainer=lambda options, config: BernoulliDiffusion(
            prediction=config.prediction,
            time_sampling=options.time_sampling,
            logit_mean=options.time_logit_mean,
            self_condition=config.self_condition,
            align_weight=options.repa_weight,
        ),
        release=DIFFUSION_RELEASE,
    )
)
register(
    GeneratorKind(
        "ar",
        ARTransformer,
        ARDecoding,
        sampler=lambda config: ARDecoding(),
        trainer=lambda options, config: ARDecoding(context_flip=options.context_flip),
        release=AR_RELEASE,
    )
)
