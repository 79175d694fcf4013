"""End-to-end Pipeline behaviour with the randomly initialised tiny bundle and the local MiniLM text encoder."""

from __future__ import annotations

import inspect
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from binlat.config import ConfigError
from binlat.pipeline import Pipeline, PipelineConfig, check_prompts


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.random_tiny()


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("bundle") / "tiny")


def arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def same_images(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))


def count_text_rows(pipe: Pipeline) -> tuple[list[int], object]:
    """Batch size of every call of the text encoder's transformer (forward pre-hook)."""
    rows: list[int] = []

    def hook(module, args, kwargs):
        rows.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0])

    return rows, pipe.text_encoder.model.register_forward_pre_hook(hook, with_kwargs=True)


FAST = dict(num_steps=3, progress=False)


# --- generation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_generate_images(pipe, kind: str) -> None:
    out = pipe(["a red circle", "a blue square"], kind=kind, seed=0, return_bits=True, **FAST)
    assert len(out.images) == 2 and out.seeds == [0, 1] and out.prompts == ["a red circle", "a blue square"]
    for im in out.images:
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (64, 64)
    assert out.bits.dtype == torch.uint8 and tuple(out.bits.shape) == (2, 16, 32)
    assert bool(((out.bits == 0) | (out.bits == 1)).all())


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_non_square_size(pipe, kind: str) -> None:
    out = pipe("a red circle", kind=kind, seed=0, height=64, width=128, **FAST)
    assert out.images[0].size == (128, 64)  # PIL: (width, height)
    out = pipe("a red circle", kind=kind, seed=0, height=128, width=64, **FAST)
    assert out.images[0].size == (64, 128)


def test_bits_not_returned_by_default(pipe) -> None:
    assert pipe("a cat", seed=0, **FAST).bits is None


def test_single_string_prompt(pipe) -> None:
    out = pipe("a cat", seed=3, **FAST)
    assert out.prompts == ["a cat"] and out.seeds == [3] and len(out.images) == 1


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_same_seed_same_images(pipe, kind: str) -> None:
    prompts = ["a red circle", "a green triangle"]
    a = pipe(prompts, kind=kind, seed=42, return_bits=True, **FAST)
    b = pipe(prompts, kind=kind, seed=42, return_bits=True, **FAST)
    c = pipe(prompts, kind=kind, seed=43, return_bits=True, **FAST)
    assert torch.equal(a.bits, b.bits) and same_images(a.images, b.images)
    assert not torch.equal(a.bits, c.bits)


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_image_i_reproducible_alone(pipe, kind: str) -> None:
    """Image i of a call with seed s is the image of that prompt generated alone with seed s + i,
    whatever the batch size or the other prompts."""
    prompts = ["a red circle", "a much longer prompt about a small blue square on a white background", "a red circle"]
    full = pipe(prompts, kind=kind, seed=10, return_bits=True, **FAST)
    assert full.seeds == [10, 11, 12]
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, kind=kind, seed=10 + i, return_bits=True, **FAST)
        assert torch.equal(alone.bits[0], full.bits[i]), i
        assert same_images(alone.images, [full.images[i]]), i
    small_batches = pipe(prompts, kind=kind, seed=10, return_bits=True, batch_size=1, **FAST)
    assert torch.equal(small_batches.bits, full.bits) and same_images(small_batches.images, full.images)


def test_prompts_encoded_once(pipe) -> None:
    rows, handle = count_text_rows(pipe)
    try:
        pipe(["a cat", "a dog", "a cat", "a cat"], seed=0, **FAST)
    finally:
        handle.remove()
    # one encoder call: the two distinct prompts + the empty prompt for guidance
    assert rows == [3]


def test_empty_prompt_encoded_once(pipe) -> None:
    rows, handle = count_text_rows(pipe)
    try:
        pipe(["a cat"] * 5, seed=0, batch_size=2, **FAST)
    finally:
        handle.remove()
    assert sum(rows) == 2  # "a cat" and "" once each, even over 3 generation batches


def test_save_and_load_roundtrip(pipe, saved) -> None:
    assert (saved / "model_index.json").is_file()
    loaded = Pipeline.from_pretrained(saved, text_encoder=pipe.text_encoder)
    assert loaded.config == pipe.config
    assert sorted(loaded.generators) == ["ar", "diffusion"]
    for kind in ("diffusion", "ar"):
        a = pipe(["a red circle", "a cat"], kind=kind, seed=5, return_bits=True, **FAST)
        b = loaded(["a red circle", "a cat"], kind=kind, seed=5, return_bits=True, **FAST)
        assert torch.equal(a.bits, b.bits) and same_images(a.images, b.images), kind


def test_save_overwrites_atomically(pipe, tmp_path) -> None:
    target = tmp_path / "bundle"
    pipe.save_pretrained(target)
    pipe.save_pretrained(target)  # saving again over an existing bundle works and leaves no temp dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (target / "model_index.json").is_file()


# --- the kind's keyword: kind=, and generator= for one release ----------------------------------------------------
def test_kind_keyword_and_position_give_the_same_bits(pipe) -> None:
    by_name = pipe(["a red circle"], kind="ar", seed=7, return_bits=True, **FAST)
    by_position = pipe(["a red circle"], "ar", seed=7, return_bits=True, **FAST)
    diffusion = pipe(["a red circle"], kind="diffusion", seed=7, return_bits=True, **FAST)
    assert torch.equal(by_name.bits, by_position.bits) and not torch.equal(by_name.bits, diffusion.bits)


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_old_generator_keyword_warns_and_gives_the_same_bits(pipe, kind: str) -> None:
    new = pipe(["a red circle", "two squares"], kind=kind, seed=3, return_bits=True, **FAST)
    with pytest.warns(DeprecationWarning, match=f"kind={kind!r}") as caught:
        old = pipe(["a red circle", "two squares"], generator=kind, seed=3, return_bits=True, **FAST)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert torch.equal(old.bits, new.bits) and same_images(old.images, new.images)
    with pytest.warns(DeprecationWarning, match="Pipeline.batches"):
        parts = list(pipe.batches(["a red circle", "two squares"], generator=kind, seed=3, return_bits=True, **FAST))
    assert torch.equal(torch.cat([p.bits for p in parts]), new.bits)
    with pytest.warns(DeprecationWarning, match="kind="):
        assert pipe.sampling_settings(generator=kind, num_steps=3) == pipe.sampling_settings(kind, num_steps=3)


@pytest.mark.parametrize(
    "call",
    [
        lambda pipe, **kw: pipe("a cat", **kw),
        lambda pipe, **kw: pipe.batches("a cat", **kw),
        lambda pipe, **kw: pipe.sampling_settings(**kw),
    ],
    ids=["call", "batches", "sampling_settings"],
)
def test_kind_given_twice_is_a_type_error(pipe, call) -> None:
    with pytest.raises(TypeError, match="kind twice"):
        call(pipe, kind="ar", generator="ar", progress=False)
    with pytest.raises(TypeError, match="kind twice"):
        pipe("a cat", "ar", generator="diffusion", progress=False)


@pytest.mark.parametrize("rng", [torch.Generator().manual_seed(0), None])
def test_a_torch_generator_is_a_type_error_naming_seed_and_kind(pipe, rng) -> None:
    """diffusers takes generator=torch.Generator(...); binlat seeds with seed= and takes the kind as kind=."""
    with pytest.raises(TypeError, match=r"binlat seeds with seed= .*the generator kind goes in kind="):
        pipe("a cat", generator=rng, progress=False)
    with pytest.raises(TypeError, match="seed="):
        pipe.batches("a cat", kind="ar", generator=rng, progress=False)


def test_call_and_batches_show_every_option() -> None:
    """__call__ and batches declare their shared options once; their signatures (help(), inspect) list each one."""
    names = ["self", "prompts", "kind", "seed", "height", "width", "batch_size", "return_bits", "progress", "settings"]
    for method in (Pipeline.__call__, Pipeline.batches):
        parameters = inspect.signature(method).parameters
        assert list(parameters) == names, method
        assert parameters["kind"].default == "diffusion" and parameters["batch_size"].default == 8
    assert inspect.signature(Pipeline.__call__).return_annotation == "PipelineOutput"


def test_the_private_flag_is_not_an_option(pipe) -> None:
    with pytest.raises(TypeError, match="keep_all"):
        pipe("a cat", keep_all=False, progress=False)


# --- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=["a cat", "   "]), "prompt 1 is empty"),
        (dict(prompts=[""]), "empty"),
        (dict(prompts=["a cat"], kind="gan"), "available"),
        (dict(prompts=["a cat"], height=65), "65"),
        (dict(prompts=["a cat"], height=64, width=65), "multiples"),
        (dict(prompts=["a cat"], num_steps=0), "steps"),
        (dict(prompts=["a cat"], guidance_scale=-1.0), "guidance"),
        (dict(prompts=["a cat"], temperature=float("nan")), "temperature"),
        (dict(prompts=["a cat"], rho=0.0), "rho"),
        (dict(prompts=["a cat"], protocol=3), "protocol"),
        (dict(prompts=["a cat"], batch_size=0), "batch size"),
    ],
)
def test_bad_arguments(pipe, kwargs, match) -> None:
    rows, handle = count_text_rows(pipe)
    try:
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs, progress=False)
    finally:
        handle.remove()
    assert rows == []  # arguments are checked before any work is done


def test_size_error_suggests_nearest_allowed(pipe) -> None:
    with pytest.raises(ValueError, match="nearest allowed: 64x64"):
        pipe("a cat", height=65, progress=False)


def test_unknown_generator_in_single_generator_bundle(pipe, saved, tmp_path) -> None:
    only = tmp_path / "only_diffusion"
    shutil.copytree(saved, only)
    index = json.loads((only / "model_index.json").read_text())
    index["generators"] = ["diffusion"]
    (only / "model_index.json").write_text(json.dumps(index))
    loaded = Pipeline.from_pretrained(only, text_encoder=pipe.text_encoder)
    with pytest.raises(ValueError, match=r"'ar'.*available: \['diffusion'\]"):
        loaded("a cat", kind="ar", progress=False)


def test_check_prompts() -> None:
    assert check_prompts("a cat") == ["a cat"]
    assert check_prompts(("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError, match="not text"):
        check_prompts(["a", 3])


def test_from_pretrained_missing_dir(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        Pipeline.from_pretrained(tmp_path / "does-not-exist")


def test_from_pretrained_without_index(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        Pipeline.from_pretrained(tmp_path / "empty")


def test_from_pretrained_unknown_key(pipe, saved, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["guidance_sclae"] = 3
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="guidance_sclae"):
        Pipeline.from_pretrained(bad, text_encoder=pipe.text_encoder)


def test_from_pretrained_invalid_json(pipe, saved, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError):
        Pipeline.from_pretrained(bad, text_encoder=pipe.text_encoder)


def test_pipeline_config_rejects_unknown_generator() -> None:
    with pytest.raises(ValueError, match="generators"):
        PipelineConfig(generators=("gan",))
    with pytest.raises(ValueError, match="generators"):
        PipelineConfig(generators=())


def test_cli_bundle_in_float16(saved, tmp_path) -> None:
    from binlat import cli
    from binlat.io import load_safetensors

    out = tmp_path / "half"
    assert (
        cli.main(
            [
                "bundle",
                "--tokenizer",
                str(saved / "tokenizer"),
                "--diffusion",
                str(saved / "diffusion"),
                "--ar",
                str(saved / "ar"),
                "--out",
                str(out),
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    for part in ("tokenizer", "diffusion", "ar"):
        stored = load_safetensors(out / part / "model.safetensors")
        assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}, part
        assert (out / part / "model.safetensors").stat().st_size < 0.55 * (
            saved / part / "model.safetensors"
        ).stat().st_size
    half = Pipeline.from_pretrained(out)
    images = half(["a red circle"], kind="ar", seed=1, **FAST).images
    assert images[0].size == (64, 64)


def test_bundle_sampling_defaults_apply_and_calls_override(saved, tmp_path) -> None:
    index = json.loads((saved / "model_index.json").read_text())
    tuned = tmp_path / "tuned"
    shutil.copytree(saved, tuned)
    (tuned / "model_index.json").write_text(
        json.dumps(
            index | {"sampling": {"diffusion": {"guidance_scale": 0.0, "num_steps": 3}, "ar": {"temperature": 0.0}}}
        )
    )
    plain, tuned_pipe = Pipeline.from_pretrained(saved), Pipeline.from_pretrained(tuned)
    assert tuned_pipe.sampling_settings("diffusion")["guidance_scale"] == 0.0
    assert tuned_pipe.sampling_settings("diffusion", guidance_scale=2.0)["guidance_scale"] == 2.0
    assert plain.sampling_settings("diffusion")["guidance_scale"] == 7.5  # built-in
    for kind, explicit in (("diffusion", {"guidance_scale": 0.0, "num_steps": 3}), ("ar", {"temperature": 0.0})):
        a = tuned_pipe(["a red circle"], kind=kind, seed=2, return_bits=True)
        b = plain(["a red circle"], kind=kind, seed=2, return_bits=True, **explicit)
        c = tuned_pipe(
            ["a red circle"],
            kind=kind,
            seed=2,
            return_bits=True,
            guidance_scale=7.5,
            **{k: v for k, v in explicit.items() if k != "guidance_scale"},
        )
        d = plain(
            ["a red circle"],
            kind=kind,
            seed=2,
            return_bits=True,
            guidance_scale=7.5,
            **{k: v for k, v in explicit.items() if k != "guidance_scale"},
        )
        assert torch.equal(a.bits, b.bits), kind
        assert torch.equal(c.bits, d.bits), kind


def test_sampling_settings_are_complete_and_checked(pipe) -> None:
    """The one resolver every entry point uses returns every setting, and refuses what no sampler could run."""
    import dataclasses

    from binlat.pipeline import BUILTIN_SAMPLING

    tuned = Pipeline(
        pipe.tokenizer,
        pipe.text_encoder,
        config=dataclasses.replace(pipe.config, sampling={"ar": {"guidance_scale": 2.0}}),
        **pipe.generators,
    )
    assert tuned.sampling_settings("ar") == BUILTIN_SAMPLING | {"guidance_scale": 2.0}
    assert tuned.sampling_settings("diffusion", rho=None, protocol=2) == BUILTIN_SAMPLING | {"protocol": 2}
    for given, needle in (
        ({"guidance_scale": -1.0}, "guidance"),
        ({"num_steps": 0}, "steps"),
        ({"rho": float("nan")}, "rho"),
        ({"protocol": 3}, "protocol"),
    ):
        with pytest.raises(ValueError, match=needle):
            tuned.sampling_settings("diffusion", **given)
    with pytest.raises(ValueError, match="generator"):
        tuned.sampling_settings("gan")
    with pytest.raises(TypeError, match="cfg"):
        tuned.sampling_settings("diffusion", cfg=2.0)


@pytest.mark.parametrize(
    "sampling, needle",
    [
        ({"gan": {}}, "generator kinds"),
        ({"diffusion": {"cfg": 3}}, "unknown setting"),
        ({"diffusion": {"guidance_scale": -1}}, "guidance scale"),
        ({"ar": {"num_steps": 0}}, "steps"),
    ],
)
def test_bad_sampling_defaults_are_config_errors(saved, tmp_path, sampling, needle) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    index = json.loads((saved / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps(index | {"sampling": sampling}))
    with pytest.raises(ConfigError, match=needle):
        Pipeline.from_pretrained(bad)


def test_cli_bundle_sampling_and_generate_records_the_settings_used(saved, tmp_path) -> None:
    from binlat import cli

    out = tmp_path / "b"
    parts = ["--tokenizer", str(saved / "tokenizer"), "--diffusion", str(saved / "diffusion"), "--out", str(out)]
    assert cli.main(["bundle", *parts, "--sampling", '{"diffusion": {"guidance_scale": 1.5, "num_steps": 2}}']) == 0
    assert Pipeline.from_pretrained(out).config.sampling == {"diffusion": {"guidance_scale": 1.5, "num_steps": 2}}
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "--model",
                str(out),
                "--out",
                str(tmp_path / "g"),
                "--seed",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "--model",
                str(out),
                "--out",
                str(tmp_path / "g"),
                "--seed",
                "0",
                "--no-progress",
                "--cfg",
                "4",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "g" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["guidance_scale"], r["num_steps"]) for r in rows] == [(1.5, 2), (4.0, 2)]
    assert cli.main(["bundle", *parts, "--sampling", "{oops"]) != 0
    assert cli.main(["bundle", *parts, "--sampling", '{"diffusion": {"cfg": 2}}']) != 0
