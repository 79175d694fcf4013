"""The reliability catalogue, Python API part.

Pipeline.__call__ refuses bad prompts, sizes, sampling settings and generators with a ValueError naming them (zero
guidance and temperature are valid; a 100,000-character prompt is truncated with a warning); from_pretrained of a
damaged directory raises FileNotFoundError, ConfigError or WeightsError naming the file; a save_pretrained that
fails part way over an existing model leaves it byte for byte; the official-weights loaders refuse pickle payloads
and truncated files; the editing functions check their arguments. What every case asserts, Env and the fixtures:
tests/reliability_support.py.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import binlat.editing as editing
import binlat.modeling as modeling_mod
from binlat.config import ConfigError
from binlat.generators import ARTransformer, DiffusionTransformer
from binlat.io import WeightsError
from binlat.official import build_official, convert_official, load_official_weights, read_official_config
from binlat.pipeline import Pipeline
from binlat.tokenizer import BinaryTokenizer
from reliability_support import (  # noqa: F401
    LONG_PROMPT,
    Env,
    bundle,
    encoder,
    env,
    leftovers,
    new_catalogue,
    official_tokenizer,
    pipe,
    snapshot,
    write_payload,
)

CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# Python API


@case("api-empty-prompt", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        env.pipe("", num_steps=1, progress=False)


@case("api-whitespace-prompt-in-list", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        env.pipe(["a cat", "\n\t  "], num_steps=1, progress=False)


@case("api-no-prompts", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="no prompts given"):
        env.pipe([], num_steps=1, progress=False)


@case("api-prompt-not-text", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 1 is not text"):
        env.pipe(["a cat", None], num_steps=1, progress=False)


@case("api-prompt-lone-surrogate", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"prompt 0 is not valid Unicode text \(unpaired surrogate at character 3\)"):
        env.pipe(["caf\ud800"], num_steps=1, progress=False)


@case("api-prompt-100k-chars-truncated-with-warning", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.warns(UserWarning, match="exceed max_length=128 tokens and were truncated"):
        result = env.pipe([LONG_PROMPT], num_steps=1, seed=0, progress=False)
    assert len(result.images) == 1 and result.images[0].size == (64, 64) and result.prompts == [LONG_PROMPT]


@case("api-size-not-a-multiple", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"image size 65x64 is not supported.*nearest allowed: 64x64"):
        env.pipe(["a cat"], num_steps=1, height=65, width=64, progress=False)


@case("api-size-zero-is-not-default", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="image size 0x0 is not supported"):
        env.pipe(["a cat"], num_steps=1, height=0, progress=False)


@case("api-size-negative", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="image size 64x-64 is not supported"):
        env.pipe(["a cat"], num_steps=1, height=64, width=-64, progress=False)


API_BAD_SAMPLING = [
    ("num_steps", 0, "steps must be an integer >= 1, got 0"),
    ("num_steps", -3, "steps must be an integer >= 1, got -3"),
    ("num_steps", math.nan, "steps must be an integer >= 1, got nan"),
    ("num_steps", math.inf, "steps must be an integer >= 1, got inf"),
    ("guidance_scale", -1.0, "guidance scale must be a finite number >= 0.0, got -1.0"),
    ("guidance_scale", math.nan, "guidance scale must be a finite number >= 0.0, got nan"),
    ("guidance_scale", math.inf, "guidance scale must be a finite number >= 0.0, got inf"),
    ("temperature", -0.5, "temperature must be a finite number >= 0.0, got -0.5"),
    ("temperature", math.nan, "temperature must be a finite number >= 0.0, got nan"),
    ("temperature", -math.inf, "temperature must be a finite number >= 0.0, got -inf"),
    ("rho", 0.0, "rho must be a finite number > 0, got 0.0"),
    ("rho", -1.0, "rho must be a finite number > 0, got -1.0"),
    ("rho", math.nan, "rho must be a finite number > 0, got nan"),
    ("rho", math.inf, "rho must be a finite number > 0, got inf"),
]
for _name, _value, _message in API_BAD_SAMPLING:

    @case(f"api-{_name}-{_value}", "Pipeline.__call__")
    def _(env: Env, name=_name, value=_value, message=_message) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            env.pipe(["a cat"], progress=False, **{"num_steps": 1, name: value})


@case("api-zero-guidance-and-temperature-are-valid", "Pipeline.__call__")
def _(env: Env) -> None:
    # Not errors: w = 0 is unguided sampling, temperature 0 thresholds the probabilities.
    for kind in ("diffusion", "ar"):
        result = env.pipe(
            ["a cat"],
            kind=kind,
            num_steps=1,
            guidance_scale=0.0,
            temperature=0.0,
            seed=1,
            progress=False,
            return_bits=True,
        )
        assert len(result.images) == 1 and result.bits.shape == (1, 16, 32)


@case("api-unknown-generator", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"generator 'gan' is not in this model; available: \['ar', 'diffusion'\]"):
        env.pipe(["a cat"], kind="gan", progress=False)


@case("api-model-dir-missing-config", "BinaryTokenizer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "tokenizer" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json; is this a BinaryTokenizer directory"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-bundle-missing-generator-dir", "Pipeline.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    shutil.rmtree(model / "ar")
    with pytest.raises(FileNotFoundError, match="ar: no such model directory"):
        Pipeline.from_pretrained(model, text_encoder=env.encoder)


@case("api-config-unknown-key", "DiffusionTransformer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "colour": "red"}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\] for DiffusionConfig"):
        DiffusionTransformer.from_pretrained(model / "diffusion")


@case("api-config-mistyped-key", "DiffusionTransformer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_heads": 2.5}))
    with pytest.raises(ConfigError, match="'num_heads' must be an integer, got 2.5"):
        DiffusionTransformer.from_pretrained(model / "diffusion")


@case("api-config-not-json", "Pipeline.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "model_index.json").write_text('{"generators": ["diffusion"],')
    with pytest.raises(ConfigError, match="model_index.json: not valid JSON"):
        Pipeline.from_pretrained(model, text_encoder=env.encoder)


@case("api-truncated-safetensors", "BinaryTokenizer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "tokenizer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"not a valid safetensors file \(truncated or corrupt\?\)"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-wrong-shape-weights", "BinaryTokenizer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "tokenizer" / "model.safetensors"
    state = load_file(weights)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, weights)
    with pytest.raises(WeightsError, match=rf"wrong shapes \[{re.escape(key)}: file"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-failed-save-over-existing-bundle", "Pipeline.save_pretrained")
def _(env: Env) -> None:
    target = env.copy_bundle()
    before = snapshot(target)
    real, calls = modeling_mod.save_safetensors, []

    def fails_on_second_part(tensors, path, metadata=None):  # the tokenizer is written, then the disk fills
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata)

    env.monkeypatch.setattr(modeling_mod, "save_safetensors", fails_on_second_part)
    with pytest.raises(OSError, match="No space left on device"):
        env.pipe.save_pretrained(target)
    assert len(calls) == 2 and snapshot(target) == before and not leftovers(env.tmp)


@case("api-official-pt-pickle-payload-refused", "official.load_official_weights")
def _(env: Env) -> None:
    marker, weights = env.tmp / "MARKER", env.tmp / "bae.pt"
    write_payload(weights, marker)
    with pytest.raises(WeightsError, match="refused to load: the file holds more than plain tensors"):
        load_official_weights(weights)
    assert not marker.exists(), "the pickle payload ran"


@case("api-official-pt-truncated", "official.load_official_weights")
def _(env: Env) -> None:
    weights = env.tmp / "bae.pt"
    torch.save({"module": {"w": torch.randn(64, 64)}}, weights)
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(WeightsError, match=r"cannot read as a PyTorch checkpoint \(truncated or corrupt\?\)"):
        load_official_weights(weights)


@case("api-official-pt-not-a-state-dict", "official.load_official_weights")
def _(env: Env) -> None:
    weights = env.tmp / "bae.pt"
    torch.save({"module": {"w": [1, 2, 3]}}, weights)
    with pytest.raises(WeightsError, match=r"expected a state dict \(or \{'module': state_dict\}\) of tensors"):
        load_official_weights(weights)


@case("api-ar-wrong-shape-weights", "ARTransformer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "ar" / "model.safetensors"
    state = load_file(weights)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[-1]
    state[key] = state[key][:-1].contiguous()
    save_file(state, weights)
    with pytest.raises(WeightsError, match=rf"wrong shapes \[{re.escape(key)}: file"):
        ARTransformer.from_pretrained(model / "ar")


for _kind, _cls in (("tokenizer", BinaryTokenizer), ("diffusion", DiffusionTransformer), ("ar", ARTransformer)):

    @case(f"api-failed-save-over-existing-{_kind}-dir", f"{_cls.__name__}.save_pretrained")
    def _(env: Env, kind=_kind, cls=_cls) -> None:
        target = Path(shutil.copytree(env.bundle / kind, env.tmp / kind))
        before = snapshot(target)
        model = cls.from_pretrained(target)

        def disk_full(tensors, path, metadata=None):
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")

        env.monkeypatch.setattr(modeling_mod, "save_safetensors", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            model.save_pretrained(target)
        assert snapshot(target) == before and not leftovers(env.tmp)


RED = Image.new("RGB", (64, 64), (220, 30, 30))


@case("api-edit-strength-above-1", "editing.edit")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\].*got 1.5"):
        editing.edit(env.pipe, RED, "a cat", strength=1.5, num_steps=1)


@case("api-interpolate-one-frame", "editing.interpolate")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="steps must be an integer >= 2, got 1"):
        editing.interpolate(env.pipe, RED, RED, steps=1)


@case("api-continue-keep-tokens-beyond-model", "editing.continue_ar")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"keep_tokens must be an integer in \[0, 16\].*got 17"):
        editing.continue_ar(env.pipe, RED, "a cat", keep_tokens=17)


@case("api-reconstruct-size-not-a-multiple", "editing.reconstruct")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"image size 65x64 is not supported.*nearest allowed: 64x64"):
        editing.reconstruct(env.pipe, RED, 65, 64)


@case("api-load-image-for-a-path-not-an-image", "editing.load_image_for")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="expected a PIL image, got str"):
        editing.load_image_for(env.pipe, "input.png")  # a path must be opened first (editing.open_image)


@case("api-image-bits-size-zero", "editing.image_bits")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"height must be an integer >= 1 \(pixels\), got 0"):
        editing.image_bits(env.pipe, RED, 0, 64)


@case("api-decode-bits-wrong-width", "editing.decode_bits")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"bits must be \[N, tokens, 32\], got \(1, 16, 31\)"):
        editing.decode_bits(env.pipe, torch.zeros(1, 16, 31))


@case("api-official-config-not-json", "official.read_official_config")
def _(env: Env) -> None:
    path = env.tmp / "config.json"
    path.write_text('{"patch_size": 8,')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        read_official_config(path)


@case("api-build-official-unknown-kind", "official.build_official")
def _(env: Env) -> None:
    config, _ = official_tokenizer(env.tmp)
    with pytest.raises(ValueError, match=r"unknown kind 'vae'"):
        build_official("vae", config, env.tmp / "weights.safetensors")


@case("api-convert-official-truncated-weights-writes-nothing", "official.convert_official")
def _(env: Env) -> None:
    config, state = official_tokenizer(env.tmp)
    weights, out = env.tmp / "bae.safetensors", env.tmp / "converted"
    save_file(state, weights)
    weights.write_bytes(weights.read_bytes()[:-200])
    with pytest.raises(WeightsError, match=r"not a valid safetensors file \(truncated or corrupt\?\)"):
        convert_official("tokenizer", config, weights, out)
    assert not out.exists() and not leftovers(env.tmp)


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)
