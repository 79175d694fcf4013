"""How the Instella-T2I release stores each of its networks: the key renames from its parameter names to binlat's,
what it keeps but never uses, how to recognise a state dict, and its conformance cases' inputs and outputs.

binlat.official converts with these tables, binlat.release finds the files in a download, binlat.conformance runs
the golden cases; binlat.registry attaches each table to its kind. They live here, apart from the registry, because
they describe the release's files, not binlat's kinds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
