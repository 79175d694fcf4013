"""A third generator kind, registered by this file alone, works everywhere a generator does.

The toy is a masked-bit generator: every bit starts masked (0.5), and each of `num_steps` rounds reveals a share of
the bits, drawn from the network's guided logits times `sharpness`, a setting no other kind has. Nothing outside
binlat.registry is told about it: the pipeline generates with it, saves and reloads it, the CLI and the server offer
it, and the trainer trains and exports it; its own setting (a keyword argument, a CLI option, an HTTP field, a
control on the served page, a record key) and its defaults come from its Settings dataclass alone."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from binlat import registry
from binlat.cli import main
from binlat.config import config_from_dict
from binlat.generators import GeneratorConfig
from binlat.modeling import ModelMixin
from binlat.pipeline import Pipeline
from binlat.processes.common import bernoulli, check_sampling_args, guide, settings_of, uniform, with_guidance
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer
from binlat.validators import is_number

MASKED = 0.5


class MaskedBitNet(nn.Module, ModelMixin):
    """Bits (0, 1 or MASKED) and the mean of each text layer's states -> one logit per bit."""

    config_class = GeneratorConfig

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.x_embed = nn.Linear(config.num_bits, config.dim)
        self.pos_emb = nn.Parameter(torch.randn(1, config.num_tokens, config.dim) * 0.02)
        self.text_proj = nn.ModuleList(nn.Linear(config.text_dim, config.dim) for _ in range(config.num_layers))
        self.proj_out = nn.Linear(config.dim, config.num_bits)

    def forward(self, x: torch.Tensor, text: list[torch.Tensor], text_mask: torch.Tensor) -> torch.Tensor:
        weights = text_mask.float()[..., None] / text_mask.float().sum(1).clamp(min=1)[:, None, None]
        context = sum(proj((states * weights).sum(1)) for proj, states in zip(self.text_proj, text))
        return self.proj_out(torch.tanh(self.x_embed(x) + self.pos_emb + context[:, None]))


@dataclass(frozen=True)
class MaskedSampling:
    num_steps: int = 4  # diffusion's default is 20: each kind's own default is its built-in value
    guidance_scale: float = 7.5
    temperature: float = 1.0
    # A plain field: its CLI option (--sharpness), type and HTTP field are read off it, its help off the metadata
    sharpness: float = field(default=1.0, metadata={"help": "factor on the guided logits before each draw"})

    def __post_init__(self) -> None:
        check_sampling_args(self.num_steps, self.guidance_scale, self.temperature)
        if not is_number(self.sharpness) or not math.isfinite(self.sharpness) or self.sharpness <= 0:
            raise ValueError(f"sharpness must be a finite number > 0, got {self.sharpness!r}")


class MaskedBits:
    Settings = MaskedSampling

    def loss(self, network, bits, text, generators=None):
        """Mask a per-sample share of the bits; cross-entropy on the masked ones."""
        bits = bits.float()
        share = uniform((1, 1), generators, bits.device)
        masked = uniform(tuple(bits.shape[1:]), generators, bits.device) < share
        logits = network(torch.where(masked, torch.full_like(bits, MASKED), bits), text.layers, text.mask).float()
        loss = F.binary_cross_entropy_with_logits(logits[masked], bits[masked]) if masked.any() else logits.sum() * 0
        with torch.no_grad():
            accuracy = ((logits > 0).float() == bits).float().mean()
        return loss, {"bit_accuracy": accuracy}

    @torch.inference_mode()
    def sample(self, network, cond, uncond, generators, settings=None, *, progress=False, **given):
        s = settings_of(MaskedSampling, settings, given)
        cfg, n = network.config, cond.mask.shape[0]
        device = next(network.parameters()).device
        text = with_guidance(cond, uncond, s.guidance_scale).to(device)
        order = uniform((cfg.num_tokens, cfg.num_bits), generators, device)  # when each bit is revealed
        x = torch.full((n, cfg.num_tokens, cfg.num_bits), MASKED, device=device)
        for step in range(s.num_steps):
            batch = x if text.mask.shape[0] == n else torch.cat((x, x))
            logits = guide(network(batch, text.layers, text.mask).float(), s.guidance_scale, n)
            drawn = (
                (logits > 0).float()
                if s.temperature == 0
                else bernoulli(torch.sigmoid(s.sharpness * logits / s.temperature), generators)
            )
            reveal = (order < (step + 1) / s.num_steps) & (x == MASKED)
            x = torch.where(reveal, drawn, x)
        return x


@pytest.fixture(scope="module")
def masked_kind():
    kind = registry.register(
        registry.GeneratorKind(
            "masked",
            MaskedBitNet,
            MaskedBits,
            sampler=lambda config: MaskedBits(),
            trainer=lambda options, config: MaskedBits(),
        )
    )
    yield kind
    registry.unregister("masked")


@pytest.fixture(scope="module")
def pipe(masked_kind) -> Pipeline:
    return Pipeline.random_tiny(seed=1)


def test_registered_kind_is_listed(masked_kind) -> None:
    assert registry.generator_kinds() == ("diffusion", "ar", "masked")
    assert registry.model_kinds()[-1] == "masked" and registry.model_class("masked") is MaskedBitNet
    assert "masked" not in registry.release_kinds()  # the release has no such network
    assert masked_kind.uses("num_steps") and not masked_kind.uses("rho")
    assert registry.kinds_that_can("redraw") == ["diffusion"]


def test_pipeline_generates_with_the_new_kind(pipe) -> None:
    assert "masked" in pipe.generators and pipe.config.generators == ("diffusion", "ar", "masked")
    out = pipe(["a red circle", "two squares"], kind="masked", num_steps=3, seed=4, return_bits=True, progress=False)
    assert out.bits.shape == (2, 16, 32) and set(out.bits.unique().tolist()) <= {0, 1}
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    again = pipe(["a red circle", "two squares"], kind="masked", num_steps=3, seed=4, return_bits=True, progress=False)
    alone = pipe(["two squares"], kind="masked", num_steps=3, seed=5, return_bits=True, progress=False)
    assert torch.equal(out.bits, again.bits) and torch.equal(out.bits[1:], alone.bits)
    with pytest.raises(ValueError, match="steps"):
        pipe(["a cat"], kind="masked", num_steps=0)


def test_the_new_kinds_own_setting_and_defaults_work_through_python(pipe) -> None:
    from binlat.pipeline import BUILTIN_SAMPLING

    assert BUILTIN_SAMPLING["num_steps"] == 20 and BUILTIN_SAMPLING["sharpness"] == 1.0
    assert pipe.sampling_settings("masked")["num_steps"] == 4  # its own default, not diffusion's
    assert pipe.sampling_settings("diffusion")["num_steps"] == 20
    kwargs = {"kind": "masked", "seed": 3, "return_bits": True, "progress": False}
    plain = pipe(["a red circle"], **kwargs)
    assert torch.equal(plain.bits, pipe(["a red circle"], sharpness=1.0, **kwargs).bits)
    sharp = pipe(["a red circle"], sharpness=8.0, **kwargs)
    assert torch.equal(sharp.bits, pipe(["a red circle"], sharpness=8.0, **kwargs).bits)
    assert not torch.equal(plain.bits, sharp.bits)
    # Every generator takes every setting and ignores those it does not read, as AR decoding ignores num_steps
    diffusion = {"kind": "diffusion", "num_steps": 2, "seed": 3, "return_bits": True, "progress": False}
    assert torch.equal(pipe(["x"], **diffusion).bits, pipe(["x"], sharpness=8.0, **diffusion).bits)
    for bad in (0.0, -1.0, math.nan, True):
        with pytest.raises(ValueError, match=f"^sharpness must be a finite number > 0, got {bad!r}$"):
            pipe(["a cat"], kind="masked", sharpness=bad)
    with pytest.raises(TypeError, match="sharpnes.*valid:.*sharpness"):
        pipe(["a cat"], kind="masked", sharpnes=2.0)


def test_bundle_with_the_new_kind_saves_loads_and_generates(pipe, tmp_path) -> None:
    bundle = pipe.save_pretrained(tmp_path / "bundle")
    assert (bundle / "masked" / "config.json").is_file()
    loaded = Pipeline.from_pretrained(bundle, text_encoder=pipe.text_encoder)
    a = pipe(["a blue square"], kind="masked", num_steps=2, seed=0, return_bits=True, progress=False)
    b = loaded(["a blue square"], kind="masked", num_steps=2, seed=0, return_bits=True, progress=False)
    assert torch.equal(a.bits, b.bits)
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "a blue square",
                "--model",
                str(bundle),
                "--generator",
                "masked",
                "--steps",
                "2",
                "--seed",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert (record["generator"], record["num_steps"], record["sharpness"]) == ("masked", 2, 1.0)


def test_the_new_kinds_own_setting_works_through_the_cli(pipe, tmp_path, capsys) -> None:
    from binlat.cli import build_parser

    bundle = pipe.save_pretrained(tmp_path / "bundle")
    generate = ["generate", "a blue square", "--model", str(bundle), "--generator", "masked", "--seed", "0"]
    out = tmp_path / "out"
    assert main([*generate, "--sharpness", "2", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert (record["sharpness"], record["num_steps"]) == (2.0, 4)  # the option, and the kind's own default
    made = pipe(["a blue square"], kind="masked", seed=0, sharpness=2.0, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out / record["file"])), np.asarray(made))
    capsys.readouterr()
    for bad, message in (("0", "sharpness must be a finite number > 0, got 0.0"), ("x", "must be a number, got 'x'")):
        with pytest.raises(SystemExit) as refused:  # argparse's exit: the option's type refused the text
            main([*generate, "--sharpness", bad, "--out", str(tmp_path / "bad"), "--no-progress"])
        assert refused.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--sharpness" in err and message in err, err
    assert not (tmp_path / "bad").exists()  # refused as the options were read, before anything was made
    usage = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    assert "--sharpness SHARPNESS factor on the guided logits before each draw; read by masked" in usage


def test_trainer_trains_and_exports_the_new_kind(pipe, tmp_path) -> None:
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    cfg = config_from_dict(
        TrainConfig,
        {
            "kind": "masked",
            "model": {"num_layers": 2, "num_heads": 2, "head_dim": 16},
            "image_size": 64,
            "batch_size": 4,
            "max_steps": 2,
            "warmup_steps": 1,
            "save_every": 2,
            "log_every": 1,
            "trackers": [],
            "generator": {"tokenizer": str(tmp_path / "tokenizer")},
        },
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no supported trackers")
        trainer = Trainer(cfg, tmp_path / "run")
        last = trainer.train()
    assert trainer.step == 2 and torch.isfinite(torch.tensor(last["loss"]))
    assert 0 <= last["bit_accuracy"] <= 1
    from binlat.train.checkpoints import export_run

    net = MaskedBitNet.from_pretrained(export_run(tmp_path / "run", tmp_path / "export"))
    assert (net.config.num_tokens, net.config.num_bits) == (16, 32) and len(net.config.text_layers) == 2
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict(TrainConfig, {"kind": "masked", "model": {"colour": "red"}})


def test_the_new_kinds_own_setting_works_through_http(pipe) -> None:
    import base64
    import io

    from fastapi.testclient import TestClient

    from binlat.serve import create_app

    with TestClient(create_app(pipe), base_url="http://127.0.0.1") as client:
        sampling = client.get("/v1/models").json()["sampling"]
        assert (sampling["masked"]["sharpness"], sampling["masked"]["num_steps"]) == (1.0, 4)
        schema = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]["requestBody"]
        field = schema["content"]["application/json"]["schema"]["properties"]["sharpness"]
        assert "factor on the guided logits before each draw" in field["description"]
        request = {"prompt": "a blue square", "generator": "masked", "seed": 0, "sharpness": 2}
        answer = client.post("/v1/generate", json=request)
        assert answer.status_code == 200, answer.text
        image = answer.json()["images"][0]
        assert (image["generator"], image["sharpness"], image["num_steps"]) == ("masked", 2.0, 4)
        made = pipe(["a blue square"], kind="masked", seed=0, sharpness=2.0, progress=False).images[0]
        served = Image.open(io.BytesIO(base64.b64decode(image["png_base64"])))
        assert np.array_equal(np.asarray(served), np.asarray(made))
        refused = client.post("/v1/generate", json=request | {"sharpness": 0})
        assert refused.status_code == 422
        assert refused.json() == {"error": "sharpness: sharpness must be a finite number > 0, got 0.0"}
        refused = client.post("/v1/generate", json=request | {"sharpness": "2"})
        assert refused.status_code == 422 and refused.json()["error"].startswith("sharpness: ")
        # The page offers the kind and its setting, typed and described by the field; /v1/edit, which runs on a kind
        # that can redraw, does not take it, so the page's edit form leaves it out
        page = client.get("/").text
        assert '<option value="masked">masked</option>' in page
        assert '<label for="sharpness">Sharpness (masked)</label>' in page
        control = re.search(r"<input id=\"sharpness\" [^>]*>", page).group(0)
        for attribute in (
            'data-setting="sharpness"',
            'data-type="float"',
            'type="number"',
            'data-kinds="masked"',
            'data-edit="0"',
            'title="factor on the guided logits before each draw"',
        ):
            assert attribute in control, (attribute, control)
        assert 'data-kinds="diffusion masked"' in re.search(r"<input id=\"steps\" [^>]*>", page).group(0)


def test_a_settings_field_needs_a_default() -> None:
    """A setting's default is its built-in value: a call may leave any setting out, so register asks for one."""

    @dataclass(frozen=True)
    class NoDefault:
        level: float

    class Process:
        Settings = NoDefault

    with pytest.raises(ValueError, match=r"\['level'\] need a default"):
        registry.register(registry.GeneratorKind("bare", MaskedBitNet, Process, sampler=Process, trainer=Process))
    assert "bare" not in registry.generator_kinds()


@pytest.mark.parametrize(
    ("field_name", "metadata", "named"),
    [
        ("seed", {}, "'seed'"),
        ("generator", {}, "'generator'"),
        ("kind", {}, "'kind'"),
        ("return_bits", {}, "'return_bits'"),
        ("count", {"short": "n"}, "'count' (its short name 'n')"),
        ("destination", {"cli_aliases": ("out",)}, "'destination' (its CLI alias 'out')"),
    ],
)
def test_a_setting_spelt_like_a_call_parameter_is_refused(field_name, metadata, named) -> None:
    """A setting is a keyword argument, CLI option and HTTP field beside the calls' own parameters: one spelt like
    them would be shadowed (or, for a CLI option, break the parser), so register refuses it, naming the field."""
    Spelt = dataclasses.make_dataclass("Spelt", [(field_name, int, field(default=1, metadata=metadata))], frozen=True)

    class Process:
        Settings = Spelt

    with pytest.raises(
        ValueError, match=rf"^generator kind 'spelt': its Settings field {re.escape(named)} is spelt"
    ) as e:
        registry.register(registry.GeneratorKind("spelt", MaskedBitNet, Process, sampler=Process, trainer=Process))
    assert "would shadow the setting; rename it" in str(e.value)
    assert "spelt" not in registry.generator_kinds()


def test_the_reserved_names_are_every_parameter_of_the_generation_calls() -> None:
    """registry.RESERVED_SETTING_NAMES, the one list register checks, holds every name the calls that take sampling
    settings take besides them: Python's keyword arguments, HTTP's fields and the CLI's options."""
    import inspect

    from binlat import editing, sampling
    from binlat.cli import build_parser
    from binlat.serve.schemas import request_bodies

    python = {
        name
        for call in (Pipeline.__call__, Pipeline.batches, editing.edit, editing.continue_ar)
        for name, p in inspect.signature(call).parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    bodies = request_bodies()
    http = (set(bodies.generate.model_fields) | set(bodies.edit.model_fields)) - set(sampling.settings())
    commands = build_parser()._subparsers._group_actions[0].choices
    parsers = [commands[name] for name in ("generate", "edit", "continue")]
    parsers.append(commands["eval"]._subparsers._group_actions[0].choices["shapes"])
    cli = {
        action.dest
        for parser in parsers
        for action in parser._actions
        if action.dest not in parser.get_default("sampling_options")
    }
    assert python and http and cli
    assert python | http | cli <= registry.RESERVED_SETTING_NAMES, sorted(
        (python | http | cli) - registry.RESERVED_SETTING_NAMES
    )
    assert {"generator", "kind"} <= registry.RESERVED_SETTING_NAMES  # the kind's old and new keyword (issue 28)
