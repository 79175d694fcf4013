"""One config class per generator kind (issue 28): the shared fields in GeneratorConfig, the diffusion options in
DiffusionConfig, the AR ones in ARConfig. A wrong-kind option fails when a config is read, naming it; config.json
files from when one class served both kinds, which hold the other kind's options at their defaults, still load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from binlat import registry
from binlat.config import ConfigError, config_from_dict, load_config
from binlat.config_help import field_comments
from binlat.generators import ARConfig, ARTransformer, DiffusionConfig, DiffusionTransformer, GeneratorConfig
from binlat.train.checkpoints import model_for_export
from binlat.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_bits=8, num_tokens=4, num_layers=2, num_heads=2, head_dim=8, text_dim=12)
DIFFUSION_OPTIONS = {"prediction", "self_condition", "pooled_text", "joint_text", "align_dim", "align_block"}
# A config.json as binlat wrote it while one class held both kinds' options: every option at its default.
OLD_STYLE = {
    **SMALL,
    "mlp_ratio": 4,
    "text_layers": None,
    "prediction": "flip",
    "self_condition": False,
    "pooled_text": False,
    "joint_text": False,
    "align_dim": 0,
    "align_block": 1,
    "text_refiner_layers": 0,
    "position_grid": None,
    "bit_groups": 1,
}


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_each_kind_has_its_own_class_with_the_shared_fields_and_only_its_own_options() -> None:
    shared = names(GeneratorConfig)
    assert names(DiffusionConfig) - shared == DIFFUSION_OPTIONS
    assert names(ARConfig) - shared == {"bit_groups"}
    assert shared <= names(DiffusionConfig) and shared <= names(ARConfig)
    assert DiffusionTransformer.config_class is DiffusionConfig and ARTransformer.config_class is ARConfig
    assert registry.generator("diffusion").config is DiffusionConfig and registry.generator("ar").config is ARConfig
    # what each reads past: exactly the other kind's options
    assert set(ARConfig.other_kind_options) == DIFFUSION_OPTIONS
    assert set(DiffusionConfig.other_kind_options) == {"bit_groups"}
    with pytest.raises(TypeError):
        ARConfig(prediction="flip")
    with pytest.raises(TypeError):
        DiffusionConfig(bit_groups=1)


def test_config_show_explains_the_shared_fields_and_the_kinds_own() -> None:
    comments = field_comments(DiffusionConfig)  # the shared fields' comments live in GeneratorConfig's source
    assert "refiner" in comments["text_refiner_layers"] and "joint attention" in comments["joint_text"]
    assert "Bernoulli logit per bit" in field_comments(ARConfig)["bit_groups"]


def test_a_network_handed_another_kinds_config_names_the_class_it_takes() -> None:
    with pytest.raises(TypeError, match="ARTransformer takes its own config class, ARConfig; got DiffusionConfig"):
        ARTransformer(DiffusionConfig(**SMALL))
    with pytest.raises(TypeError, match="DiffusionTransformer takes its own config class, DiffusionConfig"):
        DiffusionTransformer(GeneratorConfig(**SMALL))


@pytest.mark.parametrize("network", [DiffusionTransformer, ARTransformer])
def test_saving_writes_only_the_kinds_own_fields(tmp_path, network) -> None:
    network(network.config_class(**SMALL)).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert set(saved) == names(network.config_class)


@pytest.mark.parametrize("network", [DiffusionTransformer, ARTransformer])
def test_an_old_style_config_json_with_the_other_kinds_options_at_their_defaults_loads(tmp_path, network) -> None:
    torch.manual_seed(0)
    model = network(network.config_class(**SMALL)).eval()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(OLD_STYLE))
    loaded = network.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # a checkpoint's state.json records the resolved config the same way, and exports from it
    assert model_for_export("ar" if network is ARTransformer else "diffusion", OLD_STYLE).config == model.config


# models/default/ar/config.json as shipped at commit 1095bae, written while one class served both kinds
SHIPPED_AR_1095BAE = {
    "num_bits": 16,
    "num_tokens": 64,
    "num_layers": 6,
    "num_heads": 4,
    "head_dim": 48,
    "text_dim": 384,
    "mlp_ratio": 4,
    "text_layers": [0, 1, 2, 3, 4, 5],
    "prediction": "flip",
    "self_condition": False,
    "pooled_text": False,
    "joint_text": False,
    "align_dim": 0,
    "align_block": 1,
    "text_refiner_layers": 0,
    "position_grid": None,
    "bit_groups": 2,
}


def test_a_shipped_old_style_ar_config_with_the_diffusion_options_at_their_defaults_loads(tmp_path) -> None:
    assert DIFFUSION_OPTIONS <= set(SHIPPED_AR_1095BAE)
    (tmp_path / "config.json").write_text(json.dumps(SHIPPED_AR_1095BAE))
    config = ARTransformer.read_config(tmp_path)
    assert config.bit_groups == 2 and not hasattr(config, "prediction")
    # the AR shipped now was written by its own class: none of the diffusion options
    assert not DIFFUSION_OPTIONS & set(json.loads((ROOT / "models" / "default" / "ar" / "config.json").read_text()))


@pytest.mark.parametrize(
    "config_class,key,value,default",
    [
        (ARConfig, "prediction", "x0", "'flip'"),
        (ARConfig, "self_condition", True, "False"),
        (ARConfig, "pooled_text", True, "False"),
        (ARConfig, "joint_text", True, "False"),
        (ARConfig, "align_dim", 16, "0"),
        (DiffusionConfig, "bit_groups", 2, "1"),
        (DiffusionConfig, "bit_groups", True, "1"),  # True == 1 in Python, but not the default the files hold
    ],
)
def test_an_other_kind_option_set_away_from_its_default_is_refused_naming_it(config_class, key, value, default):
    ours, theirs = ("AR", "diffusion") if config_class is ARConfig else ("diffusion", "AR")
    with pytest.raises(ConfigError) as caught:
        config_from_dict(config_class, {**OLD_STYLE, key: value}, "m/config.json")
    message = str(caught.value)
    assert message.startswith(f"m/config.json: {key} is the {theirs} generator's option, not the {ours} generator's")
    assert f"only at its old default, {default} (ignored), got {value!r}" in message and "\n" not in message


def test_a_wrong_kind_option_in_a_training_config_fails_when_it_is_read(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model: bit_groups is the AR generator's option, not the diffusion"):
        load_config(TrainConfig, "diffusion/shapes-64", ["model.bit_groups=2"])
    path = tmp_path / "ar.json"
    path.write_text(json.dumps({"kind": "ar", "model": {"num_layers": 2, "self_condition": True}}))
    with pytest.raises(ConfigError, match="model: self_condition is the diffusion generator's option, not the AR"):
        load_config(TrainConfig, path)
    # the kind's own options are read as before
    assert load_config(TrainConfig, "ar/shapes-64").model_config().bit_groups == 2
    assert load_config(TrainConfig, "diffusion/shapes-64", ["model.joint_text=true"]).model_config().joint_text
