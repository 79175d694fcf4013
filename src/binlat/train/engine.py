"""One training engine for the three trainers: the loop (accelerate, logging, samples) and its checkpoints.

Every random choice of a sample (its noise, its time, its prompt dropout) is drawn from a generator seeded by
(run seed, global sample index), and the global batch of step s is always samples [s*G, (s+1)*G). So one process
and N processes with the same global batch take the same steps, and a resumed run continues bit for bit."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from ..config import config_to_dict
from ..hardware import bf16_native, require_bf16
from ..io import (
    append_jsonl,
    atomic_directory,
    atomic_write_bytes,
    check_state_dict,
    load_safetensors,
    save_safetensors,
)
from ..metrics import psnr_of_mse
from .checkpoints import (
    clean_leftovers,
    list_checkpoints,
    load_torch_state,
    numerics,
    plot_losses,
    read_state,
    resume_newest_intact,
)
from .config import TrainConfig
from .data import (
    SkippedSamples,
    describe_data,
    per_process_batch,
    sample_generator,
    training_batches,
)
from .optimizers import make_optimizer
from .schedule import EMA, lr_at
from .sharding import (
    SHARDED_TYPES,
    check_one_run,
    check_sharding_has_an_accelerator,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
)

if TYPE_CHECKING:
    from .tasks import Task

log = logging.getLogger("binlat.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stopped; its last checkpoint is intact."""


def resolve_precision(asked: str) -> str:
    """mixed_precision "auto": bf16 autocast where this process's device runs bf16 natively, else "no" (float32);
    an explicit "no" or "bf16" as given."""
    if asked != "auto":
        return asked
    # decided before accelerate's state exists (it takes the precision at creation): the device it will pick
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    device = accelerator if accelerator is not None else torch.device("cpu")
    return "bf16" if bf16_native(device) else "no"


def precision_line(asked: str, chosen: str) -> str:
    """The one line a run prints about the number format it trains in."""
    if chosen == "bf16":
        why = "native bf16 on this machine" if asked == "auto" else "mixed_precision bf16"
        return f"precision: bf16 autocast ({why}; --set mixed_precision=no trains in float32)"
    why = "no native bf16 on this machine" if asked == "auto" else "mixed_precision no"
    return f"precision: float32 ({why})"


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        resume: str | None = None,
        allow_data_commands: bool = False,
        task_factory: Callable[[TrainConfig, torch.device], Task] | None = None,
    ):
        """``allow_data_commands``: cfg.data may name shard URLs, which webdataset opens by running a program
        (``pipe:`` a shell command). Only for a data spec the caller typed, never one read from a config file.

        ``task_factory(cfg, device)``: builds the run's task in place of tasks.make_task (the bench's, which trains
        on batches it makes itself)."""
        from .tasks import make_task

        self.cfg, self.run_dir = cfg, Path(run_dir)
        # accelerate keeps one process-wide state; a new run in the same process (a notebook, the tests) may ask for
        # another precision, so drop the old run's settings (the distributed set-up itself is kept).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        check_sharding_has_an_accelerator()  # before accelerate sets up FSDP/DeepSpeed on a CPU
        self.precision = resolve_precision(cfg.mixed_precision)
        self.acc = Accelerator(mixed_precision=self.precision, log_with=self._trackers(), project_dir=str(self.run_dir))
        check_sharding_has_an_accelerator(self.acc.distributed_type, self.acc.device)
        if cfg.mixed_precision == "bf16":  # before anything is written: emulated bf16 is far slower than float32
            require_bf16(
                self.acc.device,
                "bf16 mixed-precision training",
                fix='set mixed_precision to "no" (--set mixed_precision=no)',
            )
        check_one_run(self.acc.num_processes, self.acc.distributed_type)
        self.per_process = per_process_batch(cfg.batch_size, self.acc.num_processes, cfg.grad_accum)
        torch.manual_seed(cfg.seed)  # model initialisation: identical on every process
        if task_factory is None:
            self.task = make_task(cfg, self.acc.device, allow_data_commands)
        else:
            self.task = task_factory(cfg, self.acc.device)
        self.model = self.task.model
        if cfg.grad_checkpointing:
            self.model.enable_gradient_checkpointing()
        if cfg.optimizer == "muon" and str(getattr(self.acc.distributed_type, "value", "")).upper() in SHARDED_TYPES:
            raise ValueError(
                "optimizer muon orthogonalises whole weight matrices and cannot step sharded ones "
                "(FSDP/DeepSpeed); use --set optimizer=adamw, or a DDP launch config"
            )
        self.optimizer = make_optimizer(
            self.model, cfg.optimizer, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay
        )
        self.ema = EMA(self.model, cfg.ema_decay)
        self.step, self.bad_steps, self.skipped_steps = 0, 0, 0
        self.skips = SkippedSamples(
            show=self.acc.is_main_process
        )  # the samples the readers skipped, as steps meet them
        self.images_seen = 0  # by this process since the last logged rate
        self._optimizer_state: dict | None = None  # a resumed run's, loaded once the model is prepared
        self._log_handler: logging.Handler | None = None
        # A run folder this run made, removed again if the run fails before its loop starts (nothing to keep; a
        # failure inside the loop keeps log.txt, which names the samples it skipped).
        self._made_run_dir = self.acc.is_main_process and not self.run_dir.exists()
        self._looping = False
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_leftovers(self.run_dir)
            self._log_handler = logging.FileHandler(self.run_dir / "log.txt")
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            root = logging.getLogger("binlat")
            root.setLevel(logging.INFO)
            root.addHandler(self._log_handler)
        if resume:
            try:
                resume_newest_intact(self.run_dir, resume, self._load, self._warn)
            except BaseException:
                self._drop_unused_run_dir()
                raise
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        if cfg.compile:  # the training forward only; checkpoints, EMA and samples use the plain module
            if self.acc.is_local_main_process:
                tqdm.write(
                    "compiling the training forward (compile: true): the first steps take a few minutes "
                    "(about 2 on a 2-core CPU); the progress bar's rate and ETA start after the first step"
                )
            network = self.acc.unwrap_model(self.model)
            network.forward = torch.compile(network.forward, dynamic=True)
        if self._optimizer_state is not None:  # after prepare: a sharded model takes its optimizer state sharded
            load_optimizer_state(self.acc.unwrap_model(self.model), self.optimizer, self._optimizer_state)
            self._optimizer_state = None
        self.task.prepare(self.acc)
        if self.acc.is_main_process:
            atomic_write_bytes(
                self.run_dir / "config.json", (json.dumps(config_to_dict(cfg), indent=2) + "\n").encode()
            )
        self.acc.init_trackers("tb", config=_flat(config_to_dict(cfg)))

    def _trackers(self) -> list[str]:
        wanted = []
        for name in self.cfg.trackers:
            try:
                __import__({"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name))
                wanted.append(name)
            except ImportError:
                log.warning("tracker %r requested but not installed; skipping it", name)
        return wanted

    # --- data ---------------------------------------------------------------------------------------------
    def _loader(self):
        acc, source = self.acc, self.task.dataset()
        if acc.is_main_process:
            self._describe_data(source)
        return training_batches(source, self.cfg, self.step, self.per_process, acc.num_processes, acc.process_index)

    def _describe_data(self, source) -> None:
        """One line before step 1 naming the data (describe_data); a warning when a generator's data has no captions
        at all (it would learn unconditional generation without a word)."""
        message, captioned = describe_data(source, self.cfg.data, self.cfg.image_size)
        precision = precision_line(self.cfg.mixed_precision, self.precision)
        log.info(message)
        log.info(precision)
        if self.acc.is_local_main_process:
            tqdm.write(message)
            tqdm.write(precision)
        if self.cfg.kind != "tokenizer" and captioned == 0 and not self.cfg.generator.unconditional:
            self._warn(
                f"no sample of {self.cfg.data} has a caption: the generator will learn unconditional "
                f"generation only. Put a same-named .txt beside each image (or a caption column in the "
                f"manifest), or pass --unconditional if that is what you want"
            )

    # --- loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        try:
            return self._train()
        except BaseException:
            self._drop_unused_run_dir()
            raise
        finally:
            self.close()

    def _drop_unused_run_dir(self) -> None:
        """Remove the run folder this run made when it failed before its training loop began (a bad data spec, a
        mismatched tokenizer): a failed start leaves nothing behind. A folder that existed, or holds a checkpoint,
        stays. Detaches the run's log file first (it lives in that folder)."""
        self.close()
        if self._made_run_dir and not self._looping and not list_checkpoints(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def close(self) -> None:
        """Detach this run's log file from the shared logger (several runs may share one process)."""
        if self._log_handler is not None:
            logging.getLogger("binlat").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def end_distributed(self) -> None:
        """A training process's last call: free this run's model, optimizer and data, then destroy the process
        groups (nothing to destroy in a one-process run). The trainer cannot train after it.

        The order matters. Under DDP and FSDP the model holds the process groups, inside reference cycles that only
        the garbage collector frees; left to interpreter shutdown, a gloo worker thread can need the GIL while
        Python finalises, and the process aborts after a finished run ("terminate called without an active
        exception")."""
        self.close()
        # dropped so that their memory goes now; nothing uses a trainer after this
        self.model = self.optimizer = self.ema = self.task = None  # type: ignore[assignment]
        self.acc.free_memory()
        gc.collect()
        self.acc.state.destroy_process_group()

    def train_step(self, batches: Iterator[dict]) -> dict[str, float] | None:
        """One optimiser step over grad_accum micro-batches drawn from `batches`; self.step then counts it. Returns
        the step's metrics (the mean over the global batch, the same on every process), or None for a skipped step
        (a micro-batch with no readable sample, or a non-finite loss)."""
        cfg, acc = self.cfg, self.acc
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        finite = True
        for micro in range(cfg.grad_accum):
            batch = self._next_micro_batch(batches)
            if self._no_samples(batch):
                self._skip_unreadable_step(batches, drawn=micro + 1)
                return None
            generators = [sample_generator(cfg.seed, int(i)) for i in batch["index"]]
            with self._gradient_sync(last=micro == cfg.grad_accum - 1), acc.autocast():
                loss, metrics = self.task.loss(self.model, batch, self.step, generators)
                finite &= bool(torch.isfinite(loss.detach()))
                acc.backward(loss / cfg.grad_accum)
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(torch.as_tensor(value).detach()) / cfg.grad_accum
            self.images_seen += len(batch["index"])
        if not self._finite_everywhere(finite):
            self._skip_non_finite_step()
            return None
        self.bad_steps = 0
        totals = self._global_means(sums)
        if cfg.grad_clip > 0:
            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            totals["grad_norm"] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_step(self.step, totals)
        self.ema.update(acc.unwrap_model(self.model), self.step)
        totals["lr"] = lr
        self.step += 1
        return totals

    def _next_micro_batch(self, batches: Iterator[dict]) -> dict:
        """The next micro-batch, the messages of the samples its reader skipped counted (and the first few shown)."""
        batch = next(batches)
        self.skips.add(batch.pop("skipped", []))
        return batch

    def _no_samples(self, batch: dict) -> bool:
        """Whether any process's micro-batch is empty (all processes take part, and agree)."""
        empty = torch.tensor(float(len(batch["index"]) == 0), device=self.acc.device)
        return bool(self.acc.reduce(empty, reduction="sum") > 0)

    def _skip_unreadable_step(self, batches: Iterator[dict], drawn: int) -> None:
        """Indexed data whose every sample in a micro-batch was skipped: no process trains on this step (under DDP
        all must run the same backward passes). Its other micro-batches are drawn all the same, so every later step
        keeps its samples."""
        for _ in range(drawn, self.cfg.grad_accum):
            self._next_micro_batch(batches)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        log.warning("step %d: no readable sample in a micro-batch, step skipped", self.step)
        self.step += 1

    def _gradient_sync(self, last: bool):
        """Under DDP the gradients are averaged across processes once per step, in the last micro-batch's
        backward; the others only accumulate."""
        return contextlib.nullcontext() if last else self.acc.no_sync(self.model)

    def _finite_everywhere(self, finite: bool) -> bool:
        """Whether every process's losses of this step were finite (all processes take part, and agree)."""
        finite_count = self.acc.reduce(torch.tensor(float(finite), device=self.acc.device), reduction="sum")
        return int(finite_count) == self.acc.num_processes

    def _skip_non_finite_step(self) -> None:
        """A non-finite loss anywhere: drop this step's gradients everywhere and carry on, up to max_bad_steps such
        steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.skipped_steps += 1
        log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step, self.bad_steps)
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} non-finite losses in a row at step {self.step}; stopping. "
                f"The last good checkpoint is intact (lower the learning rate, check the data)"
            )
        self.step += 1

    def _global_means(self, sums: dict[str, float]) -> dict[str, float]:
        """This process's metrics (already means over its micro-batches) as means over the global batch, as a
        single process would log them; PSNR from the mean MSE where there is one."""
        names = sorted(sums)
        means = self.acc.reduce(torch.tensor([sums[k] for k in names], device=self.acc.device), reduction="mean")
        totals = dict(zip(names, means.tolist()))
        if "mse" in totals:
            totals["psnr"] = psnr_of_mse(max(totals["mse"], 1e-10))
        return totals

    def _train(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.acc
        batches = iter(self._loader())
        self._looping = True
        first_step = self.step
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_local_main_process, desc=cfg.kind)
        postfix: dict[str, str] = {}
        last: dict[str, float] = {}
        tick, self.images_seen = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps:
                totals = self.train_step(batches)
                if cfg.compile and self.step == first_step + 1:  # the compile is paid: time the rate from here
                    bar.reset(total=cfg.max_steps)
                    bar.update(self.step - 1)
                if totals is not None:
                    last = totals
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        elapsed = time.perf_counter() - tick
                        totals["images_per_s"] = self.images_seen * acc.num_processes / max(elapsed, 1e-9)
                        tick, self.images_seen = time.perf_counter(), 0
                        self._log(totals)
                        shown: dict[str, str] = {
                            k: f"{totals[k]:.4g}" for k in ("loss", "bit_accuracy", "psnr") if k in totals
                        }
                        postfix.update(shown, lr=f"{totals['lr']:.2e}", img_s=f"{totals['images_per_s']:.1f}")
                skipped = {"skipped": str(self.skips.count)} if self.skips.count else {}
                bar.set_postfix({**postfix, **skipped}, refresh=False)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    shadow = self.ema.full()  # every rank: under FSDP this gathers the shards
                    if acc.is_main_process:
                        self._samples(shadow)
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save()
                bar.update(1)
        finally:
            bar.close()  # also on an error: its message then starts on a line of its own
            self.skips.close()
        for tracker in acc.trackers:  # not acc.end_training(): that also destroys the process group, which
            tracker.finish()  # accelerate's per-process state never re-creates for a later run here
        return last

    def _log(self, metrics: dict[str, float]) -> None:
        self.acc.log(metrics, step=self.step)
        if self.acc.is_main_process:
            append_jsonl(self.run_dir / "metrics.jsonl", [{"step": self.step, **metrics}])

    def _samples(self, shadow: dict[str, torch.Tensor] | None = None) -> None:
        model = self.ema_model(shadow)
        scores = self.task.evaluate(model)
        if scores:
            log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
            self._log(scores)
        image = self.task.sample_grid(model, self.cfg)
        if image is not None:
            (self.run_dir / "samples").mkdir(exist_ok=True)
            image.save(self.run_dir / "samples" / f"step-{self.step:08d}.png")

    def ema_model(self, shadow: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """A fresh model with the EMA weights (`shadow`: those already gathered; else gathered now)."""
        model = self.task.new_model()
        model.load_state_dict(self.ema.full() if shadow is None else shadow)
        return model.eval()

    # --- checkpoints --------------------------------------------------------------------------------------
    def save(self) -> Path:
        acc = self.acc
        target = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        acc.wait_for_everyone()
        # Full state dicts: under FSDP every rank takes part in gathering the shards, and rank 0 writes them.
        model = acc.unwrap_model(self.model)
        model_state, ema_state = full_model_state(model), self.ema.full()
        optimizer_state = full_optimizer_state(model, self.optimizer)
        if acc.is_main_process:
            with atomic_directory(target) as tmp:
                save_safetensors(model_state, tmp / "model.safetensors")
                save_safetensors(ema_state, tmp / "ema.safetensors")
                torch.save(optimizer_state, tmp / "optimizer.pt")
                task_state = self.task.save_checkpoint(tmp)
                state = {
                    "step": self.step,
                    "bad_steps": self.bad_steps,
                    "skipped_steps": self.skipped_steps,
                    "kind": self.cfg.kind,
                    "config": config_to_dict(self.cfg),
                    "model_config": config_to_dict(self.task.model_config),
                    "task": task_state,
                    "numerics": numerics(),
                }
                (tmp / "state.json").write_text(json.dumps(state, indent=2))
            for old in list_checkpoints(self.run_dir)[: -self.cfg.keep_last]:
                # Renamed first, so a kill mid-delete never leaves a step-* folder with only some files.
                doomed = old.with_name(f".{old.name}.del-{os.getpid()}")
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
            plot_losses(self.run_dir)
        acc.wait_for_everyone()
        return target

    def _warn(self, message: str) -> None:
        """A warning the user should see now: log.txt, and one line on stderr from the main process."""
        log.warning("%s", message)
        if self.acc.is_main_process:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def _load(self, path: Path) -> None:
        """Every file is read and checked before anything is changed, so a damaged checkpoint leaves the fresh
        model as it was (the caller may go on to an older one)."""
        state = read_state(path)
        if state["kind"] != self.cfg.kind:
            raise ValueError(f"{path} is a {state['kind']} checkpoint, not {self.cfg.kind}")
        model_state = load_safetensors(path / "model.safetensors")
        ema_state = load_safetensors(path / "ema.safetensors")
        check_state_dict(self.model, model_state, str(path / "model.safetensors"))
        check_state_dict(self.model, ema_state, str(path / "ema.safetensors"))
        optimizer_state = load_torch_state(path / "optimizer.pt")
        self.task.load_checkpoint(path, state.get("task", {}))
        self.model.load_state_dict(model_state)
        self.ema.shadow = ema_state
        self._optimizer_state = optimizer_state
        if state.get("numerics", numerics()) != numerics():
            # Float kernels round differently across CPUs, thread counts and torch builds: training continues
            # correctly, but no longer bit for bit as the uninterrupted run would have.
            log.warning(
                "resuming on other numerics than the checkpoint was written with (%s, now %s): the run will "
                "not end bit for bit where an uninterrupted one would",
                state["numerics"],
                numerics(),
            )
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.skipped_steps = state.get("skipped_steps", 0)
        log.info("resumed from %s at step %d", path, self.step)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out
