"""save_pretrained / from_pretrained: round trips, strict config and weight checking, atomic saving."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

import binlat.modeling
from binlat.config import ConfigError, config_from_dict, load_config
from binlat.generators import ARConfig, ARTransformer, DiffusionConfig, DiffusionTransformer, GeneratorConfig
from binlat.io import WeightsError
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig


def randomize(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def tok_config(**kw) -> TokenizerConfig:
    base = dict(
        patch_size=4,
        num_tokens=4,
        num_bits=8,
        encoder_layers=2,
        encoder_heads=2,
        encoder_head_dim=8,
        decoder_layers=2,
        decoder_heads=2,
        decoder_head_dim=8,
        rope_axes_dims=(2, 2, 4),
        downsample_after=(1,),
        upsample_after=(0,),
        image_size=16,
        rope_reference_size=64,
    )
    base.update(kw)
    return TokenizerConfig(**base)


def gen_config(config_class: type[GeneratorConfig], **kw) -> GeneratorConfig:
    base = dict(num_bits=8, num_tokens=6, num_layers=2, num_heads=2, head_dim=8, text_dim=12, text_layers=(3, 5))
    base.update(kw)
    return config_class(**base)


MODELS = {
    "tokenizer": (BinaryTokenizer, tok_config),
    "diffusion": (DiffusionTransformer, functools.partial(gen_config, DiffusionConfig)),
    "ar": (ARTransformer, functools.partial(gen_config, ARConfig)),
}


def make(kind: str, seed: int = 0, **kw):
    cls, cfg = MODELS[kind]
    torch.manual_seed(seed)
    return randomize(cls(cfg(**kw))).eval()


def run(kind: str, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    if kind == "tokenizer":
        images = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
        return model(images).reconstruction
    text = [torch.randn(2, 5, 12, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    x = torch.randint(0, 2, (2, 5, 8), generator=g).float()
    if kind == "diffusion":
        return model(x, torch.tensor([0.3, 0.8]), text, mask)
    return model(x, text, mask)


@pytest.mark.parametrize("kind", list(MODELS))
def test_round_trip(kind, tmp_path):
    model = make(kind)
    out_dir = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in Path(out_dir).iterdir()) == ["config.json", "model.safetensors"]
    loaded = MODELS[kind][0].from_pretrained(tmp_path / "model")
    assert not loaded.training
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(run(kind, model), run(kind, loaded))
    # the round trip is not trivially true: another model gives other outputs
    with torch.no_grad():
        assert not torch.allclose(run(kind, make(kind, seed=1)), run(kind, loaded), atol=1e-4)


@pytest.mark.parametrize("kind", list(MODELS))
def test_from_pretrained_dtype(kind, tmp_path):
    make(kind).save_pretrained(tmp_path / "m")
    loaded = MODELS[kind][0].from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


@pytest.mark.parametrize("kind", list(MODELS))
def test_config_json_is_plain_dataclass_json(kind, tmp_path):
    model = make(kind)
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    expected = dataclasses.asdict(model.config)
    assert set(data) == {f.name for f in dataclasses.fields(model.config)}
    for k, v in expected.items():
        assert data[k] == (list(v) if isinstance(v, tuple) else v), k
    # and reading it back strictly gives the same config (lists become tuples again)
    assert load_config(type(model.config), tmp_path / "m" / "config.json") == model.config


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", list(MODELS))
def test_unknown_config_key_is_an_error(kind, tmp_path):
    make(kind).save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", dropout_rate=0.1)
    with pytest.raises(ConfigError, match="dropout_rate"):
        MODELS[kind][0].from_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "kind,key,value",
    [
        ("diffusion", "num_layers", "two"),
        ("ar", "num_heads", 2.5),
        ("ar", "text_layers", ["a", "b"]),
        ("diffusion", "prediction", 3),
        ("tokenizer", "patch_size", "4"),
        ("tokenizer", "rope_axes_dims", 8),
        ("tokenizer", "num_bits", True),
    ],
)
def test_mistyped_config_value_is_an_error(kind, key, value, tmp_path):
    make(kind).save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", **{key: value})
    with pytest.raises(ConfigError, match=key):
        MODELS[kind][0].from_pretrained(tmp_path / "m")


def test_invalid_json_config_is_config_error(tmp_path):
    make("ar").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError):
        ARTransformer.from_pretrained(tmp_path / "m")


def test_missing_weights(tmp_path):
    make("diffusion").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors.*not found"):
        DiffusionTransformer.from_pretrained(tmp_path / "m")


def test_missing_config(tmp_path):
    make("diffusion").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusionTransformer.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("kind", list(MODELS))
def test_truncated_weights(kind, tmp_path):
    make(kind).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="(?i)truncated|corrupt"):
        MODELS[kind][0].from_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "kind,bigger",
    [
        ("diffusion", dict(num_heads=4)),
        ("ar", dict(head_dim=16)),
        ("tokenizer", dict(num_bits=16)),
    ],
)
def test_wrong_shapes_name_the_keys(kind, bigger, tmp_path):
    small = make(kind)
    small.save_pretrained(tmp_path / "small")
    big = make(kind, **bigger)
    big.save_pretrained(tmp_path / "big")
    (tmp_path / "small" / "config.json").write_text((tmp_path / "big" / "config.json").read_text())
    a, b = small.state_dict(), big.state_dict()
    mismatched = sorted(k for k in a if a[k].shape != b[k].shape)
    assert mismatched
    with pytest.raises(WeightsError, match="wrong shapes") as err:
        MODELS[kind][0].from_pretrained(tmp_path / "small")
    assert mismatched[0] in str(err.value)


def test_missing_and_unexpected_keys_named(tmp_path):
    make("ar").save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", num_layers=3, text_layers=[1, 2, 3])
    with pytest.raises(WeightsError, match=r"missing keys .*blocks\.2\.") as err:
        ARTransformer.from_pretrained(tmp_path / "m")
    assert "model.safetensors" in str(err.value)
    make("ar").save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", num_layers=1, text_layers=[1])
    with pytest.raises(WeightsError, match=r"unexpected keys .*blocks\.1\."):
        ARTransformer.from_pretrained(tmp_path / "m")


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_save_over_existing_directory_replaces_it(tmp_path):
    target = tmp_path / "m"
    make("ar", seed=0).save_pretrained(target)
    (target / "stale.txt").write_text("old")
    new = make("ar", seed=1, num_layers=1, text_layers=None)
    new.save_pretrained(target)
    assert _siblings(tmp_path) == ["m"]  # no temporary or backup directories left behind
    assert _siblings(target) == ["config.json", "model.safetensors"]
    loaded = ARTransformer.from_pretrained(target)
    assert loaded.config == new.config
    for k, v in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_failed_save_keeps_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "m"
    old = make("diffusion", seed=0)
    old.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(binlat.modeling, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        make("diffusion", seed=1).save_pretrained(target)
    assert _siblings(tmp_path) == ["m"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_save_into_new_nested_directory(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    make("diffusion").save_pretrained(target)
    assert _siblings(target.parent) == ["model"]
    DiffusionTransformer.from_pretrained(target)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rope_axes_dims=(2, 2, 2)), "rope_axes_dims"),
        (dict(rope_axes_dims=(2, 3, 3)), "rope_axes_dims"),
        (dict(rope_axes_dims=(2, 2, 2, 2)), "rope_axes_dims"),
        (dict(downsample_after=(2,)), "downsample_after"),
        (dict(downsample_after=(-1,)), "downsample_after"),
        (dict(downsample_after=(0, 0)), "downsample_after"),
        (dict(upsample_after=(5,)), "upsample_after"),
        (dict(decoder_head_dim=16), "decoder_head_dim"),
        (dict(patch_size=0), "patch_size"),
        (dict(bernoulli_temperature=0.0), "bernoulli_temperature"),
        (dict(rope_reference_size=2), "rope_reference_size"),
    ],
)
def test_invalid_tokenizer_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        tok_config(**kw)
    # the same through the strict dict reader: a ConfigError (a ValueError) naming the problem
    data = dataclasses.asdict(tok_config())
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    with pytest.raises(ConfigError, match=match):
        config_from_dict(TokenizerConfig, data)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_layers=0), "num_layers"),
        (dict(text_layers=(1,)), "text_layers"),
        (dict(text_layers=(1, -2)), "text_layers"),
        (dict(prediction="eps"), "prediction"),
    ],
)
def test_invalid_generator_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        gen_config(DiffusionConfig, **kw)


def test_from_pretrained_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        DiffusionTransformer.from_pretrained(tmp_path / "does-not-exist")


@pytest.mark.parametrize(
    ("name", "owner_name", "bare"),
    [
        ("owner/name", True, True),
        ("gpt2", False, True),  # a bare id: a text encoder's, never a binlat model's
        ("./owner/name", False, False),
        ("/models/owner", False, False),
        ("~/owner", False, False),
        ("a/b/c", False, False),
        ("", False, False),
    ],
)
def test_one_hub_id_test_for_models_releases_and_text_encoders(name, owner_name, bare):
    """Issue 28: modeling, release and the text encoder ask the same question of a name (looks_like_hub_id)."""
    assert binlat.modeling.looks_like_hub_id(name) is owner_name
    assert binlat.modeling.looks_like_hub_id(name, bare_name=True) is bare


def test_a_name_on_disk_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "notes.txt").write_text("not a model")
    (tmp_path / "gpt2").write_text("not a model")
    assert not binlat.modeling.looks_like_hub_id("owner/notes.txt")
    assert not binlat.modeling.looks_like_hub_id("gpt2", bare_name=True)
    with pytest.raises(FileNotFoundError, match="owner/notes.txt: no such model directory"):
        binlat.modeling.resolve_model_dir("owner/notes.txt")
