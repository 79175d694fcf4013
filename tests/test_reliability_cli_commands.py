"""The reliability catalogue, CLI part: every command besides generate, one wrong input each.

edit, interpolate and continue with a bad image or setting leave the output folder as it was; precompute, train
and eval never run the command of a data URL unless `--allow-data-commands` is typed (and train's config never
may); probe, config show, params, export, bundle, card, serve, bench, the eval commands and conformance refuse
their bad inputs in one line before writing anything. What every case asserts, Env and the fixtures:
tests/reliability_support.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from reliability_support import (  # noqa: F401
    Env,
    bundle,
    command_shard,
    encoder,
    env,
    leftovers,
    new_catalogue,
    pipe,
    png_bytes,
    seed_output,
    snapshot,
)

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# CLI: the other commands


def input_png(env: Env, name: str = "input.png") -> Path:
    path = env.tmp / name
    path.write_bytes(png_bytes(Image.new("RGB", (64, 64), (220, 30, 30))))
    return path


@case("cli-edit-input-not-an-image", "binlat edit")
def _(env: Env) -> None:
    notes, out = env.tmp / "notes.png", env.tmp / "out"
    notes.write_text("these are my notes, not a picture")
    before = seed_output(out)
    env.cli_fails(
        ["edit", notes, "--prompt", "a cat", "--model", env.bundle, "--out", out, "--no-progress"],
        "cannot read image",
        "notes.png",
        code=2,
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-interpolate-missing-image", "binlat interpolate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(
        ["interpolate", input_png(env), env.tmp / "gone.png", "--model", env.bundle, "--out", out], "gone.png", code=1
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-continue-keep-tokens-beyond-model", "binlat continue")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    tokens = env.pipe.tokenizer.config.num_tokens
    env.cli_fails(
        [
            "continue",
            input_png(env),
            "--prompt",
            "a cat",
            "--keep-tokens",
            tokens + 1,
            "--model",
            env.bundle,
            "--out",
            out,
            "--no-progress",
        ],
        f"keep_tokens must be an integer in [0, {tokens}]",
        f"got {tokens + 1}",
        code=2,
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-precompute-unknown-data-spec", "binlat precompute")
def _(env: Env) -> None:
    out = env.tmp / "bits"
    env.cli_fails(
        [
            "precompute",
            "--tokenizer",
            env.bundle / "tokenizer",
            "--data",
            env.tmp / "nowhere",
            "--out",
            out,
            "--no-progress",
        ],
        "unknown data spec",
        "no such file or directory",
        code=2,
    )
    assert not out.exists()


@case("cli-train-config-data-url-never-runs", "binlat train")
def _(env: Env) -> None:
    url, marker = command_shard(env)
    for flags in ([], ["--allow-data-commands"]):  # the flag covers a typed --data only, never the config's
        env.cli_fails(
            ["train", "tokenizer", "--config", env.train_config(data=url), "--output", env.tmp / "run", *flags],
            "--allow-data-commands",
            code=2,
        )
        assert not marker.exists()


@case("cli-train-set-data-url-never-runs", "binlat train")
def _(env: Env) -> None:
    url, marker = command_shard(env)
    env.cli_fails(
        ["train", "tokenizer", "--config", env.train_config(), "--set", f"data={url}", "--output", env.tmp / "run"],
        "runs it as a shell command",
        "--allow-data-commands",
        code=2,
    )
    assert not marker.exists()


@case("cli-precompute-typed-url-needs-the-flag", "binlat precompute")
def _(env: Env) -> None:
    for scheme in ("pipe", "http", "gs"):
        url, marker = command_shard(env, scheme)
        out = env.tmp / "bits"
        env.cli_fails(
            [
                "precompute",
                "--tokenizer",
                env.bundle / "tokenizer",
                "--data",
                url,
                "--out",
                out,
                "--max-samples",
                1,
                "--no-progress",
            ],
            repr(url.split(";")[0])[:-1],
            "--allow-data-commands",
            code=2,
        )
        assert not marker.exists() and not out.exists()


@case("cli-eval-reconstruction-typed-url-needs-the-flag", "binlat eval reconstruction")
def _(env: Env) -> None:
    url, marker = command_shard(env)
    env.cli_fails(
        ["eval", "reconstruction", "--model", env.bundle, "--data", url, "--out", env.tmp / "eval", "--no-progress"],
        "--allow-data-commands",
        code=2,
    )
    assert not marker.exists()


@case("cli-probe-config-of-another-kind", "binlat probe")
def _(env: Env) -> None:
    out = env.tmp / "probes"
    env.cli_fails(
        ["probe", "diffusion", "--config", env.train_config(), "--steps", 1, "--out", out],
        "is a tokenizer config, not diffusion",
        code=2,
    )
    assert not out.exists()


@case("cli-config-show-unknown-preset", "binlat config show")
def _(env: Env) -> None:
    env.cli_fails(["config", "show", "diffusion/shapes-65"], "no preset of that name", "diffusion/shapes-64", code=2)
    env.cli_fails(["config", "show", "diffusion/shapes-64", "--set", "lr=Infinity"], "lr", code=2)


@case("cli-params-config-unknown-key", "binlat params")
def _(env: Env) -> None:
    env.cli_fails(["params", env.train_config(modle={})], "unknown key(s) ['modle']", "train.json", code=2)


@case("cli-export-run-without-checkpoint", "binlat export")
def _(env: Env) -> None:
    run, out = env.tmp / "run", env.tmp / "exported"
    run.mkdir()
    env.cli_fails(["export", run, "--out", out], "no checkpoint found", code=1)
    assert not out.exists() and sorted(run.iterdir()) == []


@case("cli-bundle-sampling-not-json", "binlat bundle")
def _(env: Env) -> None:
    out = env.tmp / "bundle"
    env.cli_fails(
        [
            "bundle",
            "--tokenizer",
            env.bundle / "tokenizer",
            "--diffusion",
            env.bundle / "diffusion",
            "--out",
            out,
            "--sampling",
            "{guidance_scale: 3}",
        ],
        "--sampling: not valid JSON",
        code=2,
    )
    assert not out.exists()


@case("cli-card-report-that-is-no-report", "binlat card")
def _(env: Env) -> None:
    report = env.tmp / "report-shapes.json"
    report.write_text('{"kind": "shapes", "summary": {"overall": "high"}}')
    before = snapshot(env.bundle)
    env.cli_fails(["card", env.bundle, "--eval", report], "--eval", "not a binlat eval report", code=2)
    assert snapshot(env.bundle) == before  # refused before the card or the index was touched


@case("cli-serve-port-in-use", "binlat serve")
def _(env: Env) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # the port is bound before the model loads, so a busy port fails at once (no server is started)
        env.cli_fails(
            ["serve", "--model", env.tmp / "no-model", "--port", port], f"cannot listen on 127.0.0.1:{port}", code=1
        )


@case("cli-bench-json-folder-missing", "binlat bench")
def _(env: Env) -> None:
    target = env.tmp / "no-folder" / "bench.json"
    env.cli_fails(["bench", "--tiny", "--json", target], "--json", "does not exist", code=2)  # before any timing
    assert not target.parent.exists()


@case("cli-eval-reconstruction-model-missing", "binlat eval reconstruction")
def _(env: Env) -> None:
    out = env.tmp / "eval"
    env.cli_fails(
        ["eval", "reconstruction", "--model", env.tmp / "no-model", "--out", out, "--no-progress"],
        "no-model does not exist",
        code=1,
    )
    assert not out.exists()


@case("cli-eval-shapes-no-tokenizer-without-ground-truth", "binlat eval shapes")
def _(env: Env) -> None:
    out = env.tmp / "eval"
    env.cli_fails(
        ["eval", "shapes", "--no-tokenizer", "--model", env.bundle, "--out", out, "--no-progress"],
        "--no-tokenizer only applies with --ground-truth",
        code=2,
    )
    assert not out.exists()


@case("cli-eval-clip-score-images-missing", "binlat eval clip-score")
def _(env: Env) -> None:
    out = env.tmp / "eval"
    env.cli_fails(
        ["eval", "clip-score", "--images", env.tmp / "no-images", "--out", out], "no-images does not exist", code=1
    )
    assert not out.exists()


@case("cli-eval-fid-one-image-per-folder", "binlat eval fid")
def _(env: Env) -> None:
    real, fake, out = env.tmp / "real", env.tmp / "fake", env.tmp / "eval"
    for folder in (real, fake):
        folder.mkdir()
        input_png(env, f"{folder.name}/0.png")
    env.cli_fails(["eval", "fid", "--real", real, "--fake", fake, "--out", out], "FID needs at least 2 images", code=2)
    assert not out.exists()


@case("cli-conformance-unnamed-case-folder", "binlat conformance")
def _(env: Env) -> None:
    folder = env.tmp / "mycase"
    folder.mkdir()
    env.cli_fails(["conformance", folder], "cannot tell the network from the name", "tok_, diff_, ar_", code=2)


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)
