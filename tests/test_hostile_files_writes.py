"""Nothing lost: part of the files, values and runs catalogue of issue 29 (its items 4, 5, 6 and part of 8).

`generate` writes each batch as soon as it is decoded and claims file numbers by exclusive create (two runs into
one folder, a run stopped or killed part way); append-only logs survive a torn last line; `--resume auto|latest`
passes over a damaged newest checkpoint, saying so, and state.json's values are checked.

Cases are registered with @case("surface-what", ENTRY) as in the reliability catalogue (tests/test_reliability_*.py),
whose Env, fixtures and helpers they use (tests/reliability_support.py); tests/test_hostile_files_entries.py checks
the cli/api/data entries of this file and its siblings against that module's derivations.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import binlat.commands.common as common_mod
import binlat.pipeline as pipeline_mod
from binlat.cli import main
from binlat.config import config_from_dict
from binlat.io import append_jsonl, read_jsonl
from binlat.pipeline import Pipeline
from binlat.probe import images_to_threshold
from binlat.train.checkpoints import CheckpointError, plot_losses, read_state
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer
from hostile_files_support import fails_at_run_time, train_args
from reliability_support import (  # noqa: F401
    TRAIN_CONFIG,
    Env,
    bundle,
    checkpoint,
    encoder,
    env,
    leftovers,
    new_catalogue,
    pipe,
    seed_output,
)

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# Nothing lost: generate


@case("cli-generate-two-runs-into-one-folder", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    shared = env.encoder

    class SharedEncoder(pipeline_mod.TextEncoder):  # each run loads the bundle; both reuse the one MiniLM
        def __new__(cls, *args, **kwargs):
            return shared

    env.monkeypatch.setattr(pipeline_mod, "TextEncoder", SharedEncoder)
    gate, written, real_init, real_write = (
        threading.Barrier(2),
        {},
        common_mod.ImageWriter.__init__,
        common_mod.ImageWriter.write,
    )

    def init(self, folder):  # both runs look at the folder before either writes: the worst interleaving
        real_init(self, folder)
        gate.wait(timeout=120)

    def write(self, images, records):
        names = real_write(self, images, records)
        written.update({r["prompt"]: (n, common_mod.png_bytes(im)) for n, im, r in zip(names, images, records)})
        return names

    env.monkeypatch.setattr(common_mod.ImageWriter, "__init__", init)
    env.monkeypatch.setattr(common_mod.ImageWriter, "write", write)
    codes, bundle = [], env.bundle  # fixtures resolved here: not from the threads

    def run(tag: str, seed: int) -> None:
        argv = env.generate_args(*[f"{tag} shape {i}" for i in range(6)], out=out, model=bundle, steps=1)
        codes.append(main([str(a) for a in argv + ["--seed", seed, "--batch-size", 2]]))

    threads = [threading.Thread(target=run, args=(tag, seed)) for tag, seed in (("red", 10), ("blue", 20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert codes == [0, 0]
    lines = read_jsonl(out / "metadata.jsonl")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(lines) == 12 and len(pngs) == 12 and sorted(r["file"] for r in lines) == pngs
    for row in lines:  # each line names the file its own run wrote, holding that run's image
        assert written[row["prompt"]][0] == row["file"]
        assert (out / row["file"]).read_bytes() == written[row["prompt"]][1]
    assert not leftovers(out) and not list(out.glob(".*.claim"))


@case("cli-generate-skips-a-number-another-run-holds", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)  # 00000.png from an earlier run
    (out / ".00001.png.claim").write_bytes(b"")  # number 1 held by a run writing right now
    rc, _, err = env.cli(*env.generate_args("a", "b", out=out, steps=1))
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00002.png", "00003.png"]
    assert (out / "00000.png").read_bytes() == before["00000.png"]
    assert [r["file"] for r in read_jsonl(out / "metadata.jsonl")] == ["00000.png", "00002.png", "00003.png"]


@case("cli-generate-stopped-after-first-batch-keeps-it", "binlat generate")
def _(env: Env) -> None:
    out, calls, real = env.tmp / "out", [], Pipeline.decode

    def decode(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl+C while the second batch decodes
        return real(self, *args, **kwargs)

    env.monkeypatch.setattr(Pipeline, "decode", decode)
    rc, _, err = env.cli(*env.generate_args("p0", "p1", "p2", "p3", out=out, steps=1), "--batch-size", 2, "--seed", 5)
    assert rc == 130 and "interrupted" in err
    rows = read_jsonl(out / "metadata.jsonl")
    assert [(r["file"], r["prompt"], r["seed"]) for r in rows] == [("00000.png", "p0", 5), ("00001.png", "p1", 6)]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"] and not leftovers(out)


@case("cli-generate-killed-process-keeps-what-it-wrote", "binlat generate")
def _(env: Env) -> None:
    out, prompts = env.tmp / "out", env.tmp / "prompts.txt"
    prompts.write_text("".join(f"shape number {i}\n" for i in range(500)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "binlat.cli",
            "generate",
            "--prompts",
            prompts,
            "--model",
            env.bundle,
            "--out",
            out,
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metadata.jsonl").is_file() and len(read_jsonl(out / "metadata.jsonl")) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended (or failed) before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    rows = read_jsonl(out / "metadata.jsonl")
    assert 3 <= len(rows) < 500
    for row in rows:  # every line names a complete image
        with Image.open(out / row["file"]) as im:
            im.load()
    assert len(list(out.glob("*.png"))) - len(rows) <= 1  # at most the image whose line was being written


@case("cli-generate-after-a-torn-metadata-line", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    seed_output(out)
    with open(out / "metadata.jsonl", "a") as f:
        f.write('{"file": "00001.png", "prom')  # a run killed mid-write
    rc, _, err = env.cli(*env.generate_args("a cat", out=out, steps=1))
    assert rc == 0, err
    text = (out / "metadata.jsonl").read_text()
    assert [json.loads(line)["file"] for line in text.splitlines()] == ["00000.png", "00001.png"]


# ============================================================================================================
# Nothing lost: append-only logs


@case("log-torn-last-line-skipped-with-a-warning", "read_jsonl")
def _(env: Env) -> None:
    path = env.tmp / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    with env.request.getfixturevalue("caplog").at_level(logging.WARNING, "binlat"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
        assert "metrics.jsonl line 4: skipped a torn last line" in env.request.getfixturevalue("caplog").text
    path.write_bytes(b'{"step": 1}\n{"step": 2, "caf\xc3')  # cut inside a UTF-8 character
    assert read_jsonl(path, numbered=True) == [(1, {"step": 1})]


@case("log-bad-line-before-the-last-names-file-and-line", "read_jsonl")
def _(env: Env) -> None:
    path = env.tmp / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2"):
        plot_losses(env.tmp)


@case("log-append-cuts-a-torn-tail", "append_jsonl")
def _(env: Env) -> None:
    path = env.tmp / "probes.jsonl"
    path.write_text('{"change": "a"}\n{"change": "b", "acc')
    append_jsonl(path, [{"change": "c"}])
    assert path.read_text() == '{"change": "a"}\n{"change": "c"}\n'
    metrics = env.tmp / "metrics.jsonl"
    metrics.write_text('{"step": 1, "eval_psnr": 12.0}\n{"step": 2, "eval_psnr": 19.0}\n{"step": 3, "ev')
    assert images_to_threshold(env.tmp, batch_size=8) == 16


@case("train-resume-with-a-torn-metrics-line", "binlat train")
def _(env: Env) -> None:
    run = Path(shutil.copytree(env.checkpoint.parent.parent, env.tmp / "run"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.')
    rc, _, err = env.cli(*train_args(env, run, max_steps=2, save_every=1), "--resume", "latest")
    assert rc == 0, err  # was: "Expecting ',' delimiter", naming no file
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "metrics.jsonl: cut off a torn last line" in (run / "log.txt").read_text()


# ============================================================================================================
# Nothing lost: --resume falls back past a damaged newest checkpoint


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    Trainer(config_from_dict(TrainConfig, {**TRAIN_CONFIG, "max_steps": 2}), run).train()
    return run


def damaged_run(env: Env, *damages: Callable[[Path], None]) -> Path:
    run = Path(shutil.copytree(env.request.getfixturevalue("two_checkpoints"), env.tmp / "run"))
    for damage, step in zip(damages, (2, 1)):
        damage(run / "checkpoints" / f"step-{step:08d}")
    return run


def corrupt_state(ckpt: Path) -> None:
    (ckpt / "state.json").write_text('{"step": 2, "ki')


for _mode, _damage, _why in (
    ("auto", corrupt_state, "state.json: not valid JSON"),
    ("latest", lambda c: (c / "ema.safetensors").unlink(), "weights file not found"),
):

    @case(f"train-resume-{_mode}-passes-over-a-damaged-newest-checkpoint", "binlat train")
    def _(env: Env, mode=_mode, damage=_damage, why=_why) -> None:
        run = damaged_run(env, damage)
        rc, _, err = env.cli(*train_args(env, run, max_steps=3), "--resume", mode)
        assert rc == 0, err
        warned = [line for line in err.splitlines() if line.startswith("warning: --resume")]
        assert len(warned) == 2 and "skipping damaged checkpoint step-00000002" in warned[0] and why in warned[0]
        assert "resumed from step-00000001" in warned[1]
        log = (run / "log.txt").read_text()
        assert "skipping damaged checkpoint step-00000002" in log and "step-00000001 at step 1" in log
        assert read_state(run / "checkpoints" / "step-00000003")["step"] == 3


@case("train-resume-latest-every-checkpoint-damaged", "binlat train")
def _(env: Env) -> None:
    run = damaged_run(env, corrupt_state, lambda c: (c / "model.safetensors").write_bytes(b"junk"))
    fails_at_run_time(
        env,
        train_args(env, run, max_steps=3) + ["--resume", "latest"],
        "no intact checkpoint",
        "step-00000002, step-00000001 are damaged",
        code=1,
    )


@case("train-resume-corrupt-state-json-names-it", "binlat train")
def _(env: Env) -> None:
    run = damaged_run(env, corrupt_state)
    ckpt = run / "checkpoints" / "step-00000002"
    env.cli_fails(
        train_args(env, env.tmp / "new", max_steps=3) + ["--resume", ckpt],
        f"{ckpt / 'state.json'}: not valid JSON",
        code=1,
    )


STATE_DAMAGE = [
    ("step", 10**12, "step must be an integer in [0, 1000000000]"),
    ("step", -1, "step must be"),
    ("step", True, "step must be"),
    ("step", "2", "step must be"),
    ("bad_steps", 1.5, "bad_steps must"),
    ("kind", 5, "kind must be a JSON string"),
    ("model_config", [], "model_config must be a JSON object"),
    ("step", 7, "step 7 in the folder of step 2"),
]
for _key, _value, _message in STATE_DAMAGE:

    @case(f"train-state-json-{_key}-{_value}", "read_state")
    def _(env: Env, key=_key, value=_value, message=_message) -> None:
        ckpt = damaged_run(env) / "checkpoints" / "step-00000002"
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, key: value}))
        with pytest.raises(CheckpointError, match="state.json: " + message.replace("[", r"\[")):
            read_state(ckpt)


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_files(name: str, env: Env) -> None:
    CASES[name](env)
