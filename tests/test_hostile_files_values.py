"""Values checked: part of the files, values and runs catalogue of issue 29 (its items 4, 5, 6 and part of 8).

Non-float, fp8 and non-finite weights; non-finite or out-of-range hyperparameters; seeds, step counts and
`bundle --sampling` past their ranges.

Cases are registered with @case("surface-what", ENTRY) as in the reliability catalogue (tests/test_reliability_*.py),
whose Env, fixtures and helpers they use (tests/reliability_support.py); tests/test_hostile_files_entries.py checks
the cli/api/data entries of this file and its siblings against that module's derivations.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from binlat.config import ConfigError, config_from_dict
from binlat.generators import DiffusionTransformer
from binlat.io import WeightsError
from binlat.pipeline import PipelineConfig
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig
from binlat.train.config import TrainConfig
from hostile_files_support import train_args
from reliability_support import (  # noqa: F401
    TOKENIZER_MODEL,
    TRAIN_CONFIG,
    Env,
    bundle,
    checkpoint,
    encoder,
    env,
    leftovers,
    new_catalogue,
    noise_png,
    official_tokenizer,
    pipe,
    seed_output,
    snapshot,
)

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# Values checked: weights


def damage_tensor(path: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> str:
    state = load_file(path)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = change(state[key])
    save_file(state, path)
    return key


def first_nan(t: torch.Tensor) -> torch.Tensor:
    return t.clone().index_fill_(0, torch.tensor([0]), math.nan)


WEIGHT_DAMAGE = {
    "nan": (first_nan, "NaN"),
    "inf": (lambda t: torch.full_like(t, math.inf), "infinite"),
    "neg-inf": (lambda t: t.clone().fill_(-math.inf), "infinite"),
    "bool": (lambda t: t > 0, "stored as bool"),
    "int32": (lambda t: t.to(torch.int32), "as int32"),
    "int64": (lambda t: t.to(torch.int64), "as int64"),
    "fp8-e4m3": (lambda t: t.to(torch.float8_e4m3fn), "as float8_e4m3fn"),
    "fp8-e5m2": (lambda t: t.to(torch.float8_e5m2), "as float8_e5m2"),
}
for _what, (_change, _message) in WEIGHT_DAMAGE.items():
    for _cls, _part in ((BinaryTokenizer, "tokenizer"), (DiffusionTransformer, "diffusion")):

        @case(f"api-{_part}-weights-{_what}-refused", f"{_cls.__name__}.from_pretrained")
        def _(env: Env, cls=_cls, part=_part, change=_change, message=_message, what=_what) -> None:
            folder = Path(shutil.copytree(env.bundle / part, env.tmp / part))
            key = damage_tensor(folder / "model.safetensors", change)
            with pytest.raises(WeightsError, match=f"model.safetensors: tensor {key} .*{message}"):
                cls.from_pretrained(folder)
            if "inf" in what or what == "nan":  # accepted on request, loaded as stored
                loaded = cls.from_pretrained(folder, allow_nonfinite=True)
                assert not torch.isfinite(loaded.state_dict()[key]).all()
            else:  # no flag casts integers, booleans or fp8
                with pytest.raises(WeightsError, match=message):
                    cls.from_pretrained(folder, allow_nonfinite=True)


@case("cli-generate-inf-weights-refused-unless-allowed", "binlat generate")
def _(env: Env) -> None:
    bundle, out = env.copy_bundle(), env.tmp / "out"
    key = damage_tensor(bundle / "diffusion" / "model.safetensors", lambda t: torch.full_like(t, math.inf))
    env.cli_fails(
        env.generate_args("a cat", model=bundle, out=out),
        "diffusion/model.safetensors",
        key,
        "infinite",
        "--allow-nonfinite-weights",
        code=1,
    )  # was a black image and exit 0
    assert not list(out.glob("*.png"))
    rc, _, err = env.cli(*env.generate_args("a cat", model=bundle, out=out), "--allow-nonfinite-weights")
    assert rc == 0 and (out / "00000.png").is_file(), err


@case("cli-convert-official-nan-pt-refused", "binlat convert-official")
def _(env: Env) -> None:
    config, state = official_tokenizer(env.tmp)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    torch.save({"module": {**state, key: first_nan(state[key])}}, env.tmp / "bae.pt")
    out = env.tmp / "converted"
    env.cli_fails(
        ["convert-official", "--kind", "tokenizer", "--config", config, "--weights", env.tmp / "bae.pt", "--out", out],
        f"tensor {key} holds",
        "NaN",
        code=1,
    )
    assert not out.exists() and not leftovers(env.tmp)


@case("cli-export-nan-ema-refused", "binlat export")
def _(env: Env) -> None:
    run = Path(shutil.copytree(env.checkpoint.parent.parent, env.tmp / "run"))
    key = damage_tensor(run / "checkpoints" / "step-00000001" / "ema.safetensors", first_nan)
    env.cli_fails(["export", run, "--out", env.tmp / "export"], "ema.safetensors", key, "NaN", code=1)
    assert not (env.tmp / "export").exists()


# ============================================================================================================
# Values checked: hyperparameters


@case("cli-train-set-lr-infinity", "binlat train")
def _(env: Env) -> None:
    run = env.tmp / "run"  # was: "finished", with non-finite weights saved
    env.cli_fails(train_args(env, run) + ["--set", "lr=Infinity"], "'lr' must be a finite number, got inf", code=2)
    assert not run.exists()


BAD_HYPERPARAMETERS = [
    ("lr", math.nan),
    ("lr", 0),
    ("lr", -1e-3),
    ("weight_decay", -0.1),
    ("betas", [0.9, 1.0]),
    ("betas", [0.9]),
    ("ema_decay", 1.0),
    ("ema_decay", -0.5),
    ("grad_clip", math.inf),
    ("min_lr_ratio", 2.0),
    ("seed", -1),
    ("seed", 2**40),
    ("max_steps", 10**12),
    ("warmup_steps", -1),
    ("max_consecutive_skips", 0),
    ("num_workers", -2),
    ("tokenizer.disc_lr", 0.0),
    ("tokenizer.tau_start", 0.0),
    ("tokenizer.l1_weight", -1.0),
    ("tokenizer.soft_until_psnr", math.inf),
    ("generator.sample_guidance", math.nan),
    ("generator.sample_steps", 10**9),
    ("model.rope_theta", math.nan),
    ("model.rope_theta", -1.0),
    ("model.rope_theta", 0.0),
    ("model.bernoulli_temperature", math.inf),
]
for _key, _value in BAD_HYPERPARAMETERS:

    @case(f"train-config-{_key}-{_value}", "TrainConfig")
    def _(env: Env, key=_key, value=_value) -> None:
        data = json.loads(json.dumps(TRAIN_CONFIG))
        section, _, leaf = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[leaf] = value
        with pytest.raises(ConfigError, match=f"{leaf}.* must be"):
            config_from_dict(TrainConfig, data)
        if not section and isinstance(value, float):  # built in Python, past the JSON reader: the same refusal
            with pytest.raises(ValueError, match=f"{leaf} must be a finite number"):
                TrainConfig(**{**data, key: value})


@case("api-tokenizer-config-rope-theta-nan-refused", "BinaryTokenizer.from_pretrained")
def _(env: Env) -> None:
    folder = Path(shutil.copytree(env.bundle / "tokenizer", env.tmp / "tokenizer"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": math.nan}))  # NaN, as json writes it
    with pytest.raises(ConfigError, match=r"config\.json: 'rope_theta' must be a finite number, got nan"):
        BinaryTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 0, got -2"):
        TokenizerConfig(**{**TOKENIZER_MODEL, "rope_theta": -2.0})


# ============================================================================================================
# Smaller: seeds, step counts, --sampling


for _argv, _needle in (
    (["--seed", str(2**64)], "seed must be an integer in [0, 2**64 - 1]"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64 - 1], got -1"),
    (["--seed", str(2**64 - 1)], "seed must be an integer in [0, 2**64 - 2]"),  # 2 prompts
    (["--steps", "1e20"], "steps must be an integer, got '1e20'"),
    (["--steps", str(10**20)], "steps must be at most 10000"),
):

    @case(f"cli-generate{'-'.join(_argv)}", "binlat generate")
    def _(env: Env, argv=_argv, needle=_needle) -> None:
        out = env.tmp / "out"
        before = seed_output(out)
        env.cli_fails(env.generate_args("a cat", "a dog", out=out) + argv, needle, code=2)
        assert snapshot(out) == before


@case("api-pipeline-seed-past-2-64", "Pipeline.__call__")
def _(env: Env) -> None:
    for seed in (2**64, -3, 2.5):
        with pytest.raises(ValueError, match="seed must be an integer"):
            env.pipe("a cat", seed=seed, num_steps=1)
    with pytest.raises(ValueError, match=r"steps must be at most 10000"):
        env.pipe("a cat", num_steps=10**20)


@case("cli-interpolate-steps-10-20", "binlat interpolate")
def _(env: Env) -> None:
    a = env.tmp / "a.png"
    a.write_bytes(noise_png(64))
    env.cli_fails(
        ["interpolate", a, a, "--steps", str(10**20), "--out", env.tmp / "out"], "steps must be at most", code=2
    )


@case("cli-train-max-steps-10-20", "binlat train")
def _(env: Env) -> None:
    env.cli_fails(
        train_args(env, env.tmp / "run") + ["--max-steps", str(10**20)],
        "max_steps must be an integer >= 1 and <= 1000000000",
        code=2,
    )


@case("cli-bundle-sampling-not-an-object", "binlat bundle")
def _(env: Env) -> None:
    out = env.tmp / "out"
    env.cli_fails(
        [
            "bundle",
            "--tokenizer",
            env.bundle / "tokenizer",
            "--diffusion",
            env.bundle / "diffusion",
            "--sampling",
            "[1]",
            "--out",
            out,
        ],
        "--sampling: expected a JSON object",
        "got list",
        code=2,
    )
    assert not out.exists()
    with pytest.raises(ValueError, match="sampling must be an object"):
        PipelineConfig(sampling=[1])


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_files(name: str, env: Env) -> None:
    CASES[name](env)
