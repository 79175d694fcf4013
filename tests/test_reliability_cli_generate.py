"""The reliability catalogue, CLI part: `binlat generate` handed bad prompts, sizes, sampling settings and output
folders.

Prompts that are empty, blank, undecodable argv bytes, or come from a missing, blank or non-UTF-8 prompts file are
refused before anything is written (a 100,000-character prompt is truncated with a warning and the image made);
sizes off the tokenizer's multiple and out-of-range sampling settings are refused with the setting's own words; an
output folder under a regular file or read-only is refused and an earlier run's folder stays byte for byte;
prompts that look like paths never name a file. What every case asserts, Env and the fixtures:
tests/reliability_support.py.
"""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from reliability_support import (  # noqa: F401
    LONG_PROMPT,
    Env,
    bundle,
    encoder,
    env,
    leftovers,
    new_catalogue,
    pipe,
    seed_output,
    snapshot,
)

CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# CLI: prompts


@case("cli-empty-prompt", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("", out=out), "prompt 0 is empty", code=2)
    assert snapshot(out) == before and not leftovers(out)


@case("cli-whitespace-prompt", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("a cat", " \t ", out=out), "prompt 1 is empty", code=2)
    assert snapshot(out) == before and not leftovers(out)


@case("cli-prompts-file-blank-lines-only", "binlat generate")
def _(env: Env) -> None:
    prompts = env.tmp / "prompts.txt"
    prompts.write_text("\n   \n\t\n")
    out = env.tmp / "out"
    env.cli_fails(["generate", "--prompts", prompts, "--out", out], "no prompts", code=2)
    assert not out.exists()


@case("cli-prompts-file-invalid-utf8", "binlat generate")
def _(env: Env) -> None:
    prompts = env.tmp / "prompts.txt"
    prompts.write_bytes(b"a red circle\ncaf\xe9 \xff\xfe square\n")
    out = env.tmp / "out"
    env.cli_fails(["generate", "--prompts", prompts, "--out", out], "not valid UTF-8", "byte 16", code=2)
    assert not out.exists()


@case("cli-prompts-file-missing", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(
        ["generate", "--prompts", env.tmp / "nope.txt", "--out", env.tmp / "out"],
        "cannot read prompts file",
        "No such file",
        code=2,
    )


@case("cli-prompt-undecodable-argv-bytes", "binlat generate")
def _(env: Env) -> None:
    # On Linux, argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape).
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(
        env.generate_args(b"caf\xe9".decode("utf-8", "surrogateescape"), out=out),
        "prompt 0 is not valid Unicode text",
        code=2,
    )
    assert snapshot(out) == before


@case("cli-prompt-100k-chars-truncated-with-warning", "binlat generate")
def _(env: Env) -> None:
    # Decision: the text encoder keeps its first max_length tokens and warns; the image is made, and
    # metadata.jsonl records the prompt as given.
    out = env.tmp / "out"
    with pytest.warns(UserWarning, match="exceed max_length=128 tokens and were truncated"):
        rc, stdout, err = env.cli(*env.generate_args(LONG_PROMPT, out=out, steps=1))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "metadata.jsonl"]
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(meta) == 1 and meta[0]["prompt"] == LONG_PROMPT
    with Image.open(out / "00000.png") as im:
        assert im.size == (64, 64)


# ============================================================================================================
# CLI: sizes and sampling parameters


@case("cli-size-not-a-multiple", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    m = env.pipe.tokenizer.config.size_multiple
    env.cli_fails(
        env.generate_args("a cat", out=out) + ["--size", f"{4 * m + 1}"],
        "is not supported by this tokenizer",
        f"multiples of {m} px",
        f"nearest allowed: {4 * m}x{4 * m}",
        code=2,
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-size-HxW-one-side-bad", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    m = env.pipe.tokenizer.config.size_multiple
    env.cli_fails(
        env.generate_args("a cat", out=out) + ["--size", f"{4 * m}x{3 * m + 3}"],
        f"image size {4 * m}x{3 * m + 3} is not supported",
        code=2,
    )
    assert not list(out.glob("*.png"))


@case("cli-size-zero", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("a cat", out=out) + ["--size", "0"], "image size 0x0 is not supported", code=2)
    assert snapshot(out) == before


@case("cli-size-garbage", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out") + ["--size", "huge"], "size must be N or HxW", code=2)
    assert not (env.tmp / "out").exists()


# The option's text is read as the setting's type, then checked by the Settings dataclass that declares it: the
# words are the Python API's (API_BAD_SAMPLING), the value as that type.
CLI_BAD_SAMPLING = [
    ("steps", "0", "steps must be an integer >= 1, got 0"),
    ("steps", "-3", "steps must be an integer >= 1, got -3"),
    ("steps", "nan", "steps must be an integer, got 'nan'"),
    ("steps", "inf", "steps must be an integer, got 'inf'"),
    ("steps", "10001", "steps must be at most 10000, got 10001"),
    ("cfg", "-1", "guidance scale must be a finite number >= 0.0, got -1.0"),
    ("cfg", "nan", "guidance scale must be a finite number >= 0.0, got nan"),
    ("cfg", "inf", "guidance scale must be a finite number >= 0.0, got inf"),
    ("temperature", "-0.5", "temperature must be a finite number >= 0.0, got -0.5"),
    ("temperature", "nan", "temperature must be a finite number >= 0.0, got nan"),
    ("temperature", "-inf", "temperature must be a finite number >= 0.0, got -inf"),
    ("rho", "0", "rho must be a finite number > 0, got 0.0"),
    ("rho", "-1", "rho must be a finite number > 0, got -1.0"),
    ("rho", "nan", "rho must be a finite number > 0, got nan"),
    ("rho", "inf", "rho must be a finite number > 0, got inf"),
    ("protocol", "3", "protocol must be 1 or 2, got 3"),
    ("protocol", "two", "protocol must be an integer, got 'two'"),
]
for _option, _value, _message in CLI_BAD_SAMPLING:

    @case(f"cli-{_option}-{_value}", "binlat generate")
    def _(env: Env, option=_option, value=_value, message=_message) -> None:
        out = env.tmp / "out"
        env.cli_fails(env.generate_args("a cat", out=out) + [f"--{option}={value}"], f"--{option}", message, code=2)
        assert not out.exists()  # refused before anything was created


@case("cli-unknown-generator", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(
        env.generate_args("a cat", out=env.tmp / "out") + ["--generator", "gan"],
        "invalid choice: 'gan'",
        "diffusion",
        code=2,
    )


# ============================================================================================================
# CLI: output folders and file names


@case("cli-out-under-a-regular-file", "binlat generate")
def _(env: Env) -> None:
    blocker = env.tmp / "not-a-dir"
    blocker.write_bytes(b"keep me")
    env.cli_fails(
        env.generate_args("a cat", out=blocker / "out"), "cannot write to output directory", "Not a directory", code=2
    )
    assert blocker.read_bytes() == b"keep me"
    assert sorted(p.name for p in env.tmp.iterdir()) == ["not-a-dir"]


@case("cli-out-read-only-dir", "binlat generate")
def _(env: Env) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: directory permissions do not block writes (see cli-out-under-a-regular-file)")
    out = env.tmp / "out"
    before = seed_output(out)
    out.chmod(0o555)
    try:
        env.cli_fails(
            env.generate_args("a cat", out=out), "cannot write to output directory", "Permission denied", code=2
        )
    finally:
        out.chmod(0o755)
    assert snapshot(out) == before


@case("cli-path-traversing-and-colliding-prompts", "binlat generate")
def _(env: Env) -> None:
    prompts = ["../../escape", "/etc/passwd", "a/b\\c:*?<>|.png", "../../escape", "00000.png", ".."]
    out = env.tmp / "work" / "out"
    out.mkdir(parents=True)
    outside = {p for p in env.tmp.rglob("*") if not p.is_relative_to(out)}

    def run() -> None:
        rc, _, err = env.cli(*env.generate_args(*prompts, out=out, steps=1), "--seed", 3)
        assert rc == 0, err

    run()
    first = snapshot(out)
    names = [f"{i:05d}.png" for i in range(len(prompts))]
    assert sorted(first) == sorted(names + ["metadata.jsonl"])
    run()  # a second run continues the numbering; nothing is overwritten
    second = snapshot(out)
    assert sorted(second) == sorted([f"{i:05d}.png" for i in range(2 * len(prompts))] + ["metadata.jsonl"])
    assert all(second[n] == first[n] for n in names)
    lines = second["metadata.jsonl"].decode().splitlines()
    assert second["metadata.jsonl"].startswith(first["metadata.jsonl"]) and len(lines) == 2 * len(prompts)
    assert [json.loads(line)["prompt"] for line in lines] == prompts * 2
    assert {p for p in env.tmp.rglob("*") if not p.is_relative_to(out)} == outside  # nothing outside --out
    assert not leftovers(out)


@case("cli-dtype-bfloat16-where-emulated", "binlat generate")
def _(env: Env) -> None:
    env.monkeypatch.setenv("BINLAT_ASSUME_BF16", "0")  # a CPU without avx512_bf16/AMX, whatever this one has
    out = env.tmp / "out"
    env.cli_fails(
        env.generate_args("a cat", out=out) + ["--dtype", "bfloat16"],
        "bfloat16 generation needs a CPU with native bf16",
        "--dtype float32",
        code=2,
    )
    assert not out.exists()  # refused before the model or the output folder was touched


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)
