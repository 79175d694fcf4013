"""Checkpoints on disk: listing, the choice of the one to resume from, the numerics that exact resume needs, safe
loading, leftovers of killed writes, export of a run's EMA weights, and the loss plot beside them."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..config import config_from_dict
from ..io import WeightsError, check_state_dict, load_safetensors, read_jsonl
from ..modeling import Network
from ..validators import check_int
from .config import MAX_STEP  # a step count in state.json beyond this is damage, not a run

log = logging.getLogger("binlat.train")
CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
# What a killed process leaves behind: an atomic write's temporary (.NAME.tmp-*), a checkpoint being pruned
# (.NAME.del-*), or one moved aside while being replaced (.NAME.old-*).
LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|del|old)-[^/]+$")


STATE_KEYS = {"kind": str, "config": dict, "model_config": dict, "task": dict, "numerics": dict}


class CheckpointError(WeightsError):
    """A damaged checkpoint: its state.json is missing, unreadable or holds impossible values."""


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first: step-* folders with a state.json (a folder without one is a save that
    never completed, not a checkpoint)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def resume_newest_intact(run_dir: Path, resume: str, load: Callable[[Path], None], warn: Callable[[str], None]) -> None:
    """`load` the checkpoint `resume` names: a checkpoint folder, "latest" (the run's newest intact checkpoint) or
    "auto" (the same, or nothing for a fresh start when the run has no checkpoint). A damaged newer checkpoint (a
    missing or corrupt file, a bad state.json: `load` raised) is passed over for the one before it, with a `warn`ing
    naming it and why."""
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no state.json)")
        load(path)
        return
    found = list_checkpoints(run_dir)
    if not found:
        if resume == "auto":  # a fresh run
            return
        raise FileNotFoundError(f"--resume latest: no checkpoint under {run_dir / 'checkpoints'}")
    damaged = []
    for path in reversed(found):
        try:
            load(path)
        except (CheckpointError, WeightsError) as e:
            damaged.append(path.name)
            warn(f"--resume {resume}: skipping damaged checkpoint {path.name} ({e})")
            continue
        if damaged:
            warn(f"--resume {resume}: resumed from {path.name}, the newest intact checkpoint")
        return
    raise CheckpointError(
        f"--resume {resume}: no intact checkpoint under {run_dir / 'checkpoints'}: "
        f"{', '.join(damaged)} {'is' if len(damaged) == 1 else 'are'} damaged (the warnings "
        f"above and log.txt say why)"
    )


def read_state(path: Path) -> dict[str, Any]:
    """Checkpoint `path`'s state.json, checked; a CheckpointError naming the file when it is missing, not JSON, or
    holds values no run writes (a step that is no count, or one past MAX_STEP; a folder step-N whose step is not
    N; a field of the wrong type)."""
    file = path / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (incomplete checkpoint?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{file}: not valid JSON ({e.msg} at line {e.lineno}); the checkpoint is damaged"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    for key in ("step", "bad_steps", "skipped_steps"):
        value = state.get(key, 0 if key == "skipped_steps" else None)
        check_int(f"{file}: {key}", value, 0, MAX_STEP, error=CheckpointError)
    for key, kind in STATE_KEYS.items():
        if (key in state or key in ("kind", "model_config")) and not isinstance(state.get(key), kind):
            raise CheckpointError(
                f"{file}: {key} must be a JSON {'string' if kind is str else 'object'}, got {state.get(key)!r:.60}"
            )
    m = CHECKPOINT_RE.match(path.name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{file}: step {state['step']} in the folder of step {int(m.group(1))}")
    return state


def numerics() -> dict[str, Any]:
    """What decides float rounding besides the data: exact resume holds when these match."""
    from ..hardware import cpu_info

    return {"cpu": cpu_info().model, "threads": torch.get_num_threads(), "torch": torch.__version__}


def load_torch_state(path: Path) -> Any:
    """A torch.save'd state (optimiser) read with weights_only=True; anything else is a one-line WeightsError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found (incomplete checkpoint?)") from None
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused to load: the file holds more than plain tensors "
            f"(weights_only=True rejected it: {str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # noqa: BLE001 — zip and pickle readers raise many types on damaged files
        raise WeightsError(
            f"{path}: cannot read (truncated or corrupt?): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def clean_leftovers(run_dir: Path) -> None:
    """Tidy what a killed run left in `run_dir` and its checkpoints/: temporary files and folders of atomic
    writes and half-deleted checkpoints are removed; a checkpoint moved aside whose replacement never arrived
    is put back. Complete checkpoints are never touched."""
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            m = LEFTOVER_RE.match(entry.name)
            if not m:
                continue
            original = folder / m.group("name")
            if m.group("kind") == "old" and not original.exists():
                os.replace(entry, original)
                log.warning("restored %s (a replacement was interrupted)", original)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", entry)


def plot_losses(run_dir: Path) -> None:
    """loss.png: every logged loss-like scalar against the step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    rows = [r for r in read_jsonl(path) if isinstance(r, dict) and "step" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        {
            k
            for r in rows
            for k in r
            if "loss" in k or k in ("bit_accuracy", "psnr", "eval_psnr", "eval_shapes_accuracy")
        }
    )
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=80)
    plt.close(fig)


def model_for_export(kind: str, model_config: dict) -> Network:
    """An empty model of a run's resolved architecture (stored in every checkpoint's state.json)."""
    model_class = registry.model_class(kind)
    return model_class(config_from_dict(model_class.config_class, model_config, "model_config"))


def export_run(
    run_dir: str | Path, out: str | Path, checkpoint: str = "latest", dtype: torch.dtype | None = None
) -> Path:
    """Write the EMA weights of a run's checkpoint as a model directory that from_pretrained loads
    (`dtype`: store the weights in that precision, e.g. torch.float16 for a release half the size), with the
    provenance.json a bundle's model card reads (the run's data, steps, size and caption vocabulary: binlat.card)."""
    from ..card import provenance_file, run_provenance

    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    path = (found[-1] if found else run_dir / "checkpoints") if checkpoint == "latest" else Path(checkpoint)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint found at {path} (expected checkpoints/step-*/state.json in the run)")
    run = read_state(path)
    model = model_for_export(run["kind"], run["model_config"])
    state = load_safetensors(path / "ema.safetensors")
    check_state_dict(model, state, str(path / "ema.safetensors"))  # keys, shapes, and finite float values
    model.load_state_dict(state)
    origin = run_provenance(run.get("config") or {"kind": run["kind"]}, run.get("step"))
    return model.save_pretrained(out, dtype=dtype, files=provenance_file(origin))
