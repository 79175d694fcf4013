"""The memory and bounded-work part of issue 29's hostile-input catalogue (its item 3, and the offline part of 8).

* Work is measured before allocation (binlat.budget): a config of a million blocks, a `convert-official --kind`
  config describing a 7 GB network, `--size 8192`, a bundle's own huge image_size, are one line naming the
  estimate, the limit and the fix. Each such case runs in a subprocess under RLIMIT_AS and a timeout, so a
  regression fails instead of freezing the machine.
* Files are regular and bounded before they are read: /dev/zero, a FIFO or a directory as an image, a manifest or
  a prompts file.
* Text is encoded per batch; offline, an uncached Hub id fails at once.

Cases are registered with @case("surface-what", ENTRY) as in the reliability catalogue (tests/test_reliability_*.py),
whose Env and fixtures they use (tests/reliability_support.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from binlat import budget
from binlat.budget import MemoryBudgetError
from binlat.data.readers import ManifestDataset
from binlat.data.transforms import ImageLoadError, ImageTransform, load_image
from binlat.generators import DiffusionConfig, DiffusionTransformer
from binlat.pipeline import Pipeline
from binlat.tokenizer import BinaryTokenizer
from reliability_support import (  # noqa: F401
    Env,
    api_entry_points,
    bundle,
    cli_entry_points,
    data_entry_points,
    encoder,
    env,
    new_catalogue,
    noise_png,
    official_tokenizer,
    pipe,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
CAP = 3 * 2**30  # RLIMIT_AS of the subprocess cases: a regressed guard dies (or fails) instead of eating the machine
CASES, ENTRY_OF, case = new_catalogue()


CAPPED = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP}))
from binlat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def capped_cli(
    tmp: Path, *argv, code: int = 2, seconds: int = 60, env: dict | None = None, needles: tuple[str, ...] = ()
) -> str:
    """`binlat ARGV` in a subprocess under RLIMIT_AS = 3 GiB and a timeout: exits `code` with one stderr line
    (the last; warnings may come before), no traceback. Returns that line."""
    full = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full.pop("BINLAT_MODEL", None)
    run = subprocess.run(
        [sys.executable, "-c", CAPPED, *map(str, argv)],
        cwd=tmp,
        env=full,
        capture_output=True,
        text=True,
        timeout=seconds,
    )
    err = run.stderr
    assert run.returncode == code, (run.returncode, err[-2000:])
    assert "Traceback" not in err and "MemoryError" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("binlat")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def deep_bundle(env: Env, part: str, **over) -> Path:
    """A copy of the tiny bundle whose `part` config has `over` laid over it (the weights stay the tiny ones)."""
    copy = env.copy_bundle()
    path = copy / part / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **over}))
    return copy


# ============================================================================================================
# Networks measured from their config before anything is built


@case("cli-bundle-config-million-layers", "binlat generate")
def _(env: Env) -> None:
    model = deep_bundle(env, "diffusion", num_layers=10**6, text_layers=list(range(10**6)))
    start = time.monotonic()
    capped_cli(
        env.tmp,
        "generate",
        "a cat",
        "--model",
        model,
        "--out",
        env.tmp / "out",
        "--no-progress",
        needles=("DiffusionTransformer this config describes needs about", "layer counts"),
    )
    assert time.monotonic() - start < 60
    assert not (env.tmp / "out").exists() or not any((env.tmp / "out").glob("*.png"))


@case("api-from-pretrained-huge-width-refused", "DiffusionTransformer.from_pretrained")
def _(env: Env) -> None:
    model = deep_bundle(env, "diffusion", num_heads=4096, head_dim=4096)
    with pytest.raises(MemoryBudgetError, match=r"needs about .* more than the --max-memory \(1 GiB\)"):
        with budget.limited("1G"):
            DiffusionTransformer.from_pretrained(model / "diffusion")


@case("api-pipeline-tokenizer-million-layers", "Pipeline.from_pretrained")
def _(env: Env) -> None:
    model = deep_bundle(env, "tokenizer", decoder_layers=10**6)
    with pytest.raises(MemoryBudgetError, match="BinaryTokenizer this config describes"):
        Pipeline.from_pretrained(model, text_encoder=env.encoder)


@case("cli-convert-official-kind-huge-config", "binlat convert-official")
def _(env: Env) -> None:
    # a 131-byte config describing a ~7.6 GB generator; the weights are never read (they do not even exist)
    config = env.tmp / "huge.json"
    config.write_text(
        json.dumps(
            {
                "in_channels": 16,
                "num_layers": 64,
                "attention_head_dim": 128,
                "num_attention_heads": 32,
                "num_img_tkns": 16,
                "text_cond_dim": 64,
            }
        )
    )
    out = env.tmp / "out"
    capped_cli(
        env.tmp,
        "convert-official",
        "--kind",
        "diffusion",
        "--config",
        config,
        "--weights",
        env.tmp / "absent.pt",
        "--out",
        out,
        "--max-memory",
        "2G",
        needles=("huge.json", "needs about", "--max-memory (2 GiB)"),
    )
    assert not out.exists()


@case("cli-convert-official-kind-builds-on-meta", "binlat convert-official")
def _(env: Env) -> None:
    # the ordinary conversion still gives the same model (built on meta, the file's tensors assigned)
    config, state = official_tokenizer(env.tmp)
    out = env.tmp / "converted"
    from safetensors.torch import save_file

    save_file(state, str(env.tmp / "w.safetensors"))
    rc, _, err = env.cli(
        "convert-official",
        "--kind",
        "tokenizer",
        "--config",
        config,
        "--weights",
        env.tmp / "w.safetensors",
        "--out",
        out,
    )
    assert rc == 0, err
    model = BinaryTokenizer.from_pretrained(out)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_parameter_count_matches_a_real_build_and_extrapolates() -> None:
    cfg = DiffusionConfig(num_bits=8, num_tokens=4, num_layers=3, num_heads=2, head_dim=8, text_dim=16)
    real = sum(t.numel() for t in DiffusionTransformer(cfg).state_dict().values())
    assert budget.parameter_count(DiffusionTransformer, cfg) == real
    deep = DiffusionConfig(
        num_bits=8, num_tokens=4, num_layers=budget.EXACT_LAYERS + 3, num_heads=2, head_dim=8, text_dim=16
    )
    with torch.device("meta"):
        exact = sum(t.numel() for t in DiffusionTransformer(deep).state_dict().values())
    assert budget.parameter_count(DiffusionTransformer, deep) == exact


def test_parse_memory() -> None:
    assert budget.parse_memory("8G") == 8 * 2**30 and budget.parse_memory("1.5GiB") == 3 * 2**29
    assert budget.parse_memory("512m") == 512 * 2**20 and budget.parse_memory("4096") == 4096
    for bad in ("", "8X", "-1G", "0"):
        with pytest.raises(ValueError, match="memory must be"):
            budget.parse_memory(bad)


# ============================================================================================================
# Requests measured before any work


@case("cli-generate-size-8192", "binlat generate")
def _(env: Env) -> None:
    capped_cli(
        env.tmp,
        "generate",
        "a cat",
        "--model",
        env.bundle,
        "--size",
        "8192",
        "--steps",
        "1",
        "--out",
        env.tmp / "out",
        "--no-progress",
        needles=("8192x8192", "needs about", "TiB", "smaller --size"),
    )


@case("cli-generate-batch-over-max-memory", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(
        env.generate_args(*["a cat"] * 64, out=env.tmp / "out") + ["--batch-size", "64", "--max-memory", "16M"],
        "64 image(s) of 64x64 in batches of 64",
        "more than the --max-memory (16 MiB)",
        "--batch-size",
        code=2,
    )


@case("cli-generate-max-memory-garbage", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(
        env.generate_args("a cat", out=env.tmp / "out") + ["--max-memory", "lots"],
        "max memory: memory must be a size such as 8G",
        code=2,
    )


@case("cli-bundle-own-image-size-huge", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    index = model / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "image_size": 65536}))
    capped_cli(
        env.tmp,
        "generate",
        "a cat",
        "--model",
        model,
        "--steps",
        "1",
        "--out",
        env.tmp / "out",
        "--no-progress",
        needles=("this bundle", "image_size 65536", "needs about"),
    )


@case("api-pipeline-call-size-refused-before-work", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(MemoryBudgetError, match=r"1 image\(s\) of 4096x4096"):
        env.pipe("a cat", num_steps=1, height=4096, width=4096, progress=False)
    # __call__ keeps every image: many prompts at a size that fits one by one are measured all together
    with budget.limited("64M"), pytest.raises(MemoryBudgetError, match=r"5000 image\(s\) of 64x64"):
        env.pipe(["a cat"] * 5000, num_steps=1, progress=False)


@case("api-editing-reconstruct-size-refused", "editing.reconstruct")
def _(env: Env) -> None:
    from PIL import Image

    from binlat import editing

    with pytest.raises(MemoryBudgetError, match="4096x4096"):
        editing.reconstruct(env.pipe, Image.new("RGB", (64, 64)), height=4096, width=4096)


@case("api-size-beyond-trained-warns-once", "Pipeline.__call__")
def _(env: Env) -> None:
    fresh = Pipeline(
        env.pipe.tokenizer, env.encoder, config=env.pipe.config, diffusion=env.pipe.generators["diffusion"]
    )
    with pytest.warns(UserWarning, match="128x128 is beyond the 64 px"):
        fresh("a cat", num_steps=1, height=128, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh("a cat", num_steps=1, height=128, progress=False)  # once only
        fresh("a cat", num_steps=1, progress=False)  # the trained size: no warning


def test_text_encoded_per_batch(pipe) -> None:
    rows: list[int] = []
    handle = pipe.text_encoder.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        out = pipe([f"prompt number {i}" for i in range(7)], seed=0, num_steps=1, batch_size=3, progress=False)
    finally:
        handle.remove()
    assert len(out.images) == 7
    assert rows == [4, 3, 1]  # 3 prompts + "" then 3 then 1: never more than a batch (+ "") at once


# ============================================================================================================
# Files checked before reading


@case("data-load-image-dev-zero", "load_image")
def _(env: Env) -> None:
    for path, kind in (("/dev/zero", "a device"), (env.tmp, "a directory")):
        with pytest.raises(ImageLoadError, match=f"is {kind}, not a regular file"):
            load_image(path)
    fifo = env.tmp / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="is a FIFO"):
        load_image(fifo)  # opened without blocking: no writer needed for the refusal
    big = env.tmp / "big.png"
    with open(big, "wb") as f:
        f.truncate(257 * 2**20)  # sparse: no disk used
    with pytest.raises(ImageLoadError, match="over the 256 MiB limit"):
        load_image(big)


@case("data-manifest-image-dev-zero", "ManifestDataset")
def _(env: Env) -> None:
    good = env.tmp / "good.png"
    good.write_bytes(noise_png(64))
    manifest = env.tmp / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": p, "caption": "x"}) for p in ("/dev/zero", str(good))))
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP}))
from binlat.data.readers import ManifestDataset
from binlat.data.transforms import ImageTransform
ds = ManifestDataset({str(manifest)!r}, ImageTransform(64))
print(len(list(ds)))
"""
    run = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "1" and "a device, not a regular file" in run.stderr, (run.stdout, run.stderr)
    with pytest.raises(ValueError, match="manifest /dev/zero is a device, not a regular file"):
        ManifestDataset("/dev/zero", ImageTransform(64))


@case("cli-prompts-file-dev-zero", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(
        ["generate", "--prompts", "/dev/zero", "--model", env.bundle, "--out", env.tmp / "out"],
        "prompts file /dev/zero is a device, not a regular file",
        code=2,
    )


@case("cli-model-config-is-a-fifo", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "model_index.json").unlink()
    os.mkfifo(model / "model_index.json")
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out", model=model), "is a FIFO")


# ============================================================================================================
# Offline is fast


@case("cli-offline-uncached-hub-id-fails-at-once", "binlat generate")
def _(env: Env) -> None:
    home = env.tmp / "hf"
    start = time.monotonic()
    line = capped_cli(
        env.tmp,
        "generate",
        "a cat",
        "--model",
        "someorg/not-cached",
        "--out",
        env.tmp / "out",
        code=1,
        env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"},
        needles=("HF_HUB_OFFLINE is set", "huggingface-cli download someorg/not-cached --local-dir DIR"),
    )
    assert time.monotonic() - start < 5, line


@case("cli-no-network-uncached-hub-id-fails-at-once", "binlat generate")
def _(env: Env) -> None:
    # a Hub endpoint nobody listens on stands for a dead network
    start = time.monotonic()
    capped_cli(
        env.tmp,
        "generate",
        "a cat",
        "--model",
        "someorg/not-cached",
        "--out",
        env.tmp / "out",
        code=1,
        env={
            "HF_HOME": str(env.tmp / "hf"),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_ENDPOINT": "http://127.0.0.1:9",
        },
        needles=("127.0.0.1 is unreachable", "huggingface-cli download someorg/not-cached"),
    )
    assert time.monotonic() - start < 5


@case("api-text-encoder-offline-uncached", "Pipeline.from_pretrained")
def _(env: Env) -> None:
    env.monkeypatch.setenv("HF_HOME", str(env.tmp / "hf"))
    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match="huggingface-cli download someorg/no-encoder --local-dir DIR"):
        Pipeline.from_pretrained(env.bundle, text_encoder="someorg/no-encoder")
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_memory(name: str, env: Env) -> None:
    CASES[name](env)


def test_entries_are_entry_points() -> None:
    required = {"cli": cli_entry_points(), "api": api_entry_points(), "data": data_entry_points()}
    for name, entry in ENTRY_OF.items():
        surface = name.split("-")[0]
        assert surface in required, name
        assert entry in required[surface], f"case {name}: {entry!r} is not a {surface} entry point"
