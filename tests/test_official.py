"""Official (Instella-T2I release) checkpoints: conformance cases, conversion, and refusal of bad inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from binlat.cli import main as cli_main
from binlat.config import ConfigError
from binlat.conformance import TOLERANCE, case_kind, run_case
from binlat.io import WeightsError, load_safetensors
from binlat.official import MODEL_CLASSES, RELEASE_SCALE, build_official, convert_official, load_official_weights

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
CASES = sorted(p for p in FIXTURES.iterdir() if p.is_dir() and (p / "io.safetensors").is_file())
CASE_IDS = [p.name for p in CASES]
EXPECTED_OUTPUTS = {
    "tokenizer": {"encoder_out", "logits", "bits", "decoded", "decoded_random", "reconstruction"},
    "diffusion": {"out"},
    "ar": {"out_first", "out_prefix"},
}


def case(prefix: str) -> Path:
    return next(p for p in CASES if p.name.startswith(prefix))


def copy_case(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name  # keep the name: the kind comes from the prefix
    shutil.copytree(src, dst)
    return dst


def test_fixtures_present():
    assert {case_kind(p) for p in CASES} == {"tokenizer", "diffusion", "ar"}


@pytest.mark.parametrize("case_dir", CASES, ids=CASE_IDS)
def test_conformance_case(case_dir):
    results = run_case(case_dir)
    kind = case_kind(case_dir)
    names = {c.name for c in results}
    io_names = set(load_safetensors(case_dir / "io.safetensors"))
    assert EXPECTED_OUTPUTS[kind] & io_names <= names  # every stored output was compared
    assert names
    bad = [(c.name, c.max_abs_error) for c in results if not c.ok]
    assert not bad, f"{case_dir.name}: outputs off: {bad}"
    for c in results:
        if c.name.endswith("bits"):
            assert c.tolerance == 0 and c.max_abs_error == 0
        else:
            assert c.tolerance == TOLERANCE and c.max_abs_error < 1e-4


@pytest.mark.parametrize("case_dir", CASES, ids=CASE_IDS)
def test_convert_official_loads_with_from_pretrained(case_dir, tmp_path):
    kind = case_kind(case_dir)
    out = convert_official(kind, case_dir / "config.json", case_dir / "weights.safetensors", tmp_path / "model")
    assert sorted(p.name for p in Path(out).iterdir()) == ["config.json", "model.safetensors", "provenance.json"]
    origin = json.loads((Path(out) / "provenance.json").read_text())  # the license travels with the weights
    assert origin["converted_from"] == "amd/Instella-T2I" and origin["license"]["id"] == "other"
    model = MODEL_CLASSES[kind].from_pretrained(out)
    direct = build_official(kind, case_dir / "config.json", case_dir / "weights.safetensors")
    assert model.config == direct.config
    for k, v in direct.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    if kind == "ar":
        # the release's unused timestep embedding is dropped
        assert not any(k.startswith("time_embed") for k in model.state_dict())


@pytest.mark.parametrize("prefix", ["tok_a", "diff_a", "ar_a"])
def test_pt_module_checkpoint_converts_identically(prefix, tmp_path):
    src = case(prefix)
    kind = case_kind(src)
    state = load_safetensors(src / "weights.safetensors")
    torch.save({"module": state}, tmp_path / "ckpt.pt")
    a = convert_official(kind, src / "config.json", src / "weights.safetensors", tmp_path / "from_st")
    b = convert_official(kind, src / "config.json", tmp_path / "ckpt.pt", tmp_path / "from_pt")
    sa, sb = load_safetensors(Path(a) / "model.safetensors"), load_safetensors(Path(b) / "model.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert json.loads((Path(a) / "config.json").read_text()) == json.loads((Path(b) / "config.json").read_text())
    # a bare state dict in a .pt works too
    torch.save(state, tmp_path / "bare.pt")
    assert load_official_weights(tmp_path / "bare.pt").keys() == state.keys()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_malicious_pt_is_refused_and_nothing_runs(tmp_path):
    src = case("diff_a")
    marker = tmp_path / "PWNED"
    state = load_safetensors(src / "weights.safetensors")
    evil = tmp_path / "evil.pt"
    torch.save({"module": state, "extra": _Exploit(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refused"):
        load_official_weights(evil)
    with pytest.raises(WeightsError):
        convert_official("diffusion", src / "config.json", evil, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # the payload is real: an unsafe load would have run it
    check = tmp_path / "PROOF"
    torch.save(_Exploit(check), tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert check.read_text().strip() == "pwned"


def test_truncated_pt_is_weights_error(tmp_path):
    state = load_safetensors(case("ar_a") / "weights.safetensors")
    torch.save({"module": state}, tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        load_official_weights(tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match="not found"):
        load_official_weights(tmp_path / "nope.pt")


# (case, official key, binlat name of the same parameter)
REMOVE = [
    ("diff_a", "transformer_blocks.0.attn.q_proj.weight", "blocks.0.attn.to_q.weight"),
    ("ar_a", "split_token", "start_token"),
    ("tok_a", "decoder.up_layers.0.conv.weight", "decoder.resample.0.conv.weight"),
    ("tok_a", "quantizer.embed", "quantizer.codebook"),
]
SHAPE = [
    ("diff_a", "transformer_blocks.1.ff.net.2.bias", "blocks.1.mlp.fc2.bias"),
    ("ar_a", "transformer_blocks.0.pos_emb", "blocks.0.pos_emb"),
    ("tok_b_scaled", "encoder.transformer_blocks.2.mlp.gate_proj.weight", "encoder.blocks.2.mlp.gate.weight"),
]


def _convert_modified(prefix: str, tmp_path: Path, edit) -> None:
    src = case(prefix)
    state = dict(load_safetensors(src / "weights.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "w.safetensors"))
    convert_official(case_kind(src), src / "config.json", tmp_path / "w.safetensors", tmp_path / "out")


def _names_key(message: str, official: str, binlat: str) -> bool:
    return official in message or binlat in message


@pytest.mark.parametrize("prefix,official,converted", REMOVE)
def test_missing_official_key(prefix, official, converted, tmp_path):
    with pytest.raises(WeightsError, match="missing") as err:
        _convert_modified(prefix, tmp_path, lambda s: s.pop(official))
    assert _names_key(str(err.value), official, converted), str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prefix,official,converted", SHAPE)
def test_wrong_shape_official_key(prefix, official, converted, tmp_path):
    def edit(s):
        s[official] = torch.zeros(*s[official].shape[:-1], s[official].shape[-1] + 1)

    with pytest.raises(WeightsError, match="wrong shape") as err:
        _convert_modified(prefix, tmp_path, edit)
    assert _names_key(str(err.value), official, converted), str(err.value)


@pytest.mark.parametrize(
    "prefix,extra",
    [
        ("diff_a", "transformer_blocks.0.attn.extra_scale"),
        ("ar_a", "some_new_head.weight"),
        ("tok_a", "encoder.transformer_blocks.5.attn.q_proj.weight"),
        ("tok_a", "encoder.down_layers.1.conv.weight"),  # a second down-sampling layer the config does not list
    ],
)
def test_extra_official_key(prefix, extra, tmp_path):
    def edit(s):
        s[extra] = torch.zeros(3)

    with pytest.raises(WeightsError) as err:
        _convert_modified(prefix, tmp_path, edit)
    msg = str(err.value)
    assert extra in msg or extra.replace("transformer_blocks", "blocks").replace("q_proj", "to_q") in msg, msg


@pytest.mark.parametrize("prefix,official,converted", REMOVE[:1] + SHAPE[:1])
def test_official_weights_error_uses_official_key_names(prefix, official, converted, tmp_path):
    def edit(s):
        if (prefix, official, converted) in REMOVE:
            s.pop(official)
        else:
            s[official] = torch.zeros(s[official].shape[-1] + 1)

    with pytest.raises(WeightsError) as err:
        _convert_modified(prefix, tmp_path, edit)
    assert official in str(err.value)


@pytest.mark.parametrize("prefix", ["tok_a", "diff_a", "ar_a"])
def test_unknown_official_config_key(prefix, tmp_path):
    src = case(prefix)
    data = json.loads((src / "config.json").read_text())
    data["use_magic"] = True
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="use_magic"):
        convert_official(case_kind(src), tmp_path / "config.json", src / "weights.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mistyped_official_config_value(tmp_path):
    src = case("diff_a")
    data = json.loads((src / "config.json").read_text())
    data["num_layers"] = "two"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="num_layers"):
        build_official("diffusion", tmp_path / "config.json", src / "weights.safetensors")


def _rewrite_io(case_dir: Path, edit) -> None:
    io = dict(load_safetensors(case_dir / "io.safetensors"))
    edit(io)
    save_file({k: v.contiguous() for k, v in io.items()}, str(case_dir / "io.safetensors"))


@pytest.mark.parametrize(
    "prefix,name", [("tok_a", "decoded"), ("tok_b_scaled", "encoder_out"), ("diff_a", "out"), ("ar_a", "out_prefix")]
)
def test_perturbed_expected_output_is_reported(prefix, name, tmp_path):
    dst = copy_case(case(prefix), tmp_path)

    def edit(io):
        io[name] = io[name].clone()
        io[name].view(-1)[0] += 1e-3

    _rewrite_io(dst, edit)
    results = {c.name: c for c in run_case(dst)}
    assert not results[name].ok
    assert results[name].max_abs_error == pytest.approx(1e-3, abs=1e-5)
    assert all(c.ok for n, c in results.items() if n != name)


def test_flipped_expected_bit_is_reported(tmp_path):
    dst = copy_case(case("tok_b_scaled"), tmp_path)

    def edit(io):
        io["bits"] = io["bits"].clone()
        io["bits"][0, 0, 0] = 1 - io["bits"][0, 0, 0]

    _rewrite_io(dst, edit)
    results = {c.name: c for c in run_case(dst)}
    assert not results["bits"].ok and results["bits"].max_abs_error == 1.0
    assert results["decoded"].ok  # decoded comes from the computed bits, not the stored ones


@pytest.mark.parametrize(
    "prefix,names",
    [
        ("tok_a", ["bits", "encoder_out", "logits", "decoded", "reconstruction"]),
        ("tok_b_scaled", ["bits", "decoded_random"]),
        ("diff_a", ["out"]),
        ("ar_a", ["out_first", "out_prefix"]),
    ],
)
def test_expected_outputs_are_never_inputs(prefix, names, tmp_path):
    src = case(prefix)
    original = load_safetensors(src / "io.safetensors")
    dst = copy_case(src, tmp_path)
    _rewrite_io(dst, lambda io: io.update({n: torch.zeros_like(io[n]) for n in names}))
    results = {c.name: c for c in run_case(dst)}
    for n in names:
        # the computed output is still the true one, so its error is now the size of the true output
        true_size = original[n].abs().max().item()
        assert true_size > 0.1
        assert not results[n].ok
        assert results[n].max_abs_error == pytest.approx(true_size, abs=1e-4)
    # outputs whose expected values were left alone still match: nothing downstream consumed the zeros
    for n, c in results.items():
        if n not in names:
            assert c.ok, (n, c.max_abs_error)


# --- the tokenizer's position scale: the release decodes with set_scale(RELEASE_SCALE) though its config lacks "scale"
ABSENT = object()


def cli_run(argv: list[str]) -> int:
    try:
        return cli_main(argv)
    except SystemExit as e:  # argparse rejects a bad option value itself
        return e.code


def _tok_config(tmp_path: Path, scale) -> Path:
    """tok_a's release config with "scale" set to `scale`, or without the key when scale is ABSENT."""
    data = json.loads((case("tok_a") / "config.json").read_text())
    data.pop("scale")
    if scale is not ABSENT:
        data["scale"] = scale
    path = tmp_path / "bae_config.json"
    path.write_text(json.dumps(data))
    return path


# (the config's "scale", the keyword / --scale given (ABSENT: not given), the expected rope_reference_size)
SCALE_RULE = [
    (ABSENT, ABSENT, RELEASE_SCALE),  # the release's config: no key -> what the release uses at inference
    (None, ABSENT, None),  # an explicit null still means no scaling (conformance case tok_a)
    (ABSENT, 512, 512),  # an explicit value overrides ...
    (None, 256, 256),
    (200, None, None),  # ... and so does "none"
    (ABSENT, None, None),
]
SCALE_IDS = ["absent", "null", "absent+512", "null+256", "200+none", "absent+none"]


@pytest.mark.parametrize("in_config,given,expected", SCALE_RULE, ids=SCALE_IDS)
def test_convert_official_scale_rule(in_config, given, expected, tmp_path):
    config = _tok_config(tmp_path, in_config)
    weights = case("tok_a") / "weights.safetensors"
    kwargs = {} if given is ABSENT else {"scale": given}
    out = convert_official("tokenizer", config, weights, tmp_path / "out", **kwargs)
    assert json.loads((Path(out) / "config.json").read_text())["rope_reference_size"] == expected
    model = MODEL_CLASSES["tokenizer"].from_pretrained(out)
    assert model.config.rope_reference_size == expected
    assert model.scale == (None if expected is None else expected / 8)  # one S for encoder and decoder
    assert build_official("tokenizer", config, weights, **kwargs).config == model.config


@pytest.mark.parametrize("in_config,given,expected", SCALE_RULE, ids=SCALE_IDS)
def test_cli_convert_official_scale_rule(in_config, given, expected, tmp_path, capsys):
    config = _tok_config(tmp_path, in_config)
    argv = [
        "convert-official",
        "--kind",
        "tokenizer",
        "--config",
        str(config),
        "--weights",
        str(case("tok_a") / "weights.safetensors"),
        "--out",
        str(tmp_path / "out"),
    ]
    if given is not ABSENT:
        argv += ["--scale", "none" if given is None else str(given)]
    assert cli_run(argv) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_reference_size"] == expected


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--kind", "tokenizer", "--scale", "big"], "scale"),
        (["--kind", "tokenizer", "--scale", "0"], "scale"),
        (["--kind", "tokenizer", "--scale", "4"], "rope_reference_size"),  # below one 8 px patch
        (["--kind", "diffusion", "--scale", "1024"], "tokenizer"),  # no scale in a generator: refused, not ignored
    ],
)
def test_cli_convert_official_bad_scale(argv, message, tmp_path, capsys):
    kind = argv[1]
    src = case("tok_a" if kind == "tokenizer" else "diff_a")
    code = cli_run(
        [
            "convert-official",
            *argv,
            "--config",
            str(src / "config.json"),
            "--weights",
            str(src / "weights.safetensors"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", [0, -1024, 1024.0, "1024", True])
def test_convert_official_rejects_bad_scale_keyword(scale, tmp_path):
    with pytest.raises(ValueError, match="scale"):
        convert_official(
            "tokenizer",
            case("tok_a") / "config.json",
            case("tok_a") / "weights.safetensors",
            tmp_path / "out",
            scale=scale,
        )
    assert not (tmp_path / "out").exists()


def test_release_config_decodes_with_the_release_scale(tmp_path):
    """Against the release's rule: a config without "scale" decodes exactly as one converted with scale 1024,
    and not as one without scaling (the release never decodes unscaled)."""
    weights = case("tok_a") / "weights.safetensors"
    release = build_official("tokenizer", _tok_config(tmp_path, ABSENT), weights)
    explicit = build_official("tokenizer", _tok_config(tmp_path, None), weights, scale=1024)
    unscaled = build_official("tokenizer", _tok_config(tmp_path, None), weights)
    bits = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.inference_mode():
        got, want, other = (m.decode(bits, 64, 64) for m in (release, explicit, unscaled))
    assert torch.equal(got, want)
    assert (got - other).abs().max().item() > 1e-2
    # encoding uses the same reference size (one rope_reference_size, as set_scale sets both halves)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(release.encode_logits(images), explicit.encode_logits(images))
        assert not torch.allclose(release.encode_logits(images), unscaled.encode_logits(images), atol=1e-3)
