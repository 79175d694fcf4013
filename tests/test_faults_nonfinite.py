"""Fault injection: non-finite losses through the CLI (`binlat train`) are skipped and counted, and a run whose
losses stay non-finite stops with one line and exit 1, its last good checkpoint whole."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from binlat import cli
from binlat.io import load_safetensors
from binlat.train.tasks import TokenizerTask
from faults_support import TINY, assert_checkpoints_intact

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


def nonfinite_at(monkeypatch, steps: set[int], value: float) -> None:
    original = TokenizerTask.loss

    def loss(self, model, batch, step, gens):
        result, metrics = original(self, model, batch, step, gens)
        return (result * value if step in steps else result), metrics

    monkeypatch.setattr(TokenizerTask, "loss", loss)


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    """Exit code and the stderr lines, leaving out the progress bar's carriage-return updates (a message must
    start a line of its own, not trail the bar)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [seg for seg in re.split(r"[\r\n]", err) if seg.strip() and not seg.startswith("tokenizer:")]
    assert all(("\n" + line) in ("\n" + err) for line in lines), err
    return code, lines


def test_nonfinite_losses_are_skipped_counted_and_a_persistent_run_stops_cleanly(tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # a) a few NaN losses: those steps are skipped and counted, the run finishes.
        config = tmp_path / "some.json"
        config.write_text(json.dumps({**TINY, "max_steps": 5, "save_every": 5}))
        with monkeypatch.context() as m:
            nonfinite_at(m, {1, 3}, float("nan"))
            code, lines = run_cli(capsys, "train", "tokenizer", "--config", config, "--output", tmp_path / "some")
        assert code == 0 and lines == [], lines
        state = json.loads((tmp_path / "some" / "checkpoints" / "step-00000005" / "state.json").read_text())
        assert state["skipped_steps"] == 2 and state["bad_steps"] == 0
        logged = [json.loads(line)["step"] for line in (tmp_path / "some" / "metrics.jsonl").read_text().splitlines()]
        assert logged == [1, 3, 5]  # the skipped steps (2 and 4) logged nothing
        assert (tmp_path / "some" / "log.txt").read_text().count("non-finite loss, step skipped") == 2

        # b) a run that keeps producing inf losses stops with one line and exit 1; its last good checkpoint is whole.
        config = tmp_path / "bad.json"
        config.write_text(json.dumps({**TINY, "max_steps": 20, "save_every": 3, "max_bad_steps": 3}))
        run = tmp_path / "bad"
        with monkeypatch.context() as m:
            nonfinite_at(m, set(range(3, 100)), float("inf"))
            code, lines = run_cli(capsys, "train", "tokenizer", "--config", config, "--output", run)
        assert code == 1
        assert len(lines) == 1 and lines[0].startswith("binlat: error: 3 non-finite losses in a row at step 5"), lines
        assert "last good checkpoint is intact" in lines[0]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]
        assert_checkpoints_intact(run)
        ema = load_safetensors(run / "checkpoints" / "step-00000003" / "ema.safetensors")
        assert all(torch.isfinite(v).all() for v in ema.values())
        # ... and the run continues from it once the fault is gone.
        code, lines = run_cli(
            capsys, "train", "tokenizer", "--config", config, "--output", run, "--resume", "latest", "--max-steps", "4"
        )
        assert code == 0 and lines == [], lines
        assert json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())["bad_steps"] == 0
    finally:
        torch.set_num_threads(threads)
