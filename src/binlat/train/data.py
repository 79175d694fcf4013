"""What the engine reads: keyed per-sample randomness, indexed data in step order, streaming data in stream order,
and skipped samples.

Every random choice of a sample is drawn from a generator seeded by (run seed, global sample index), and the global
batch of step s is always samples [s*G, (s+1)*G), whatever the number of processes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm.auto import tqdm

from ..data.base import skip_log_line, skip_logged
from ..data.collate import collate  # the engine's collate_fn too, shared with every data reader

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("binlat.train")


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of one sample: a function of (seed, global index) only."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class IndexedData(Dataset):
    """Global sample index -> sample (with its index). Map-style data is read in a fresh permutation per epoch."""

    def __init__(self, source: Any, seed: int):
        self.source, self.seed = source, seed
        # Finite sources (folders, manifests) are read in a fresh permutation per epoch; the shapes stream is endless.
        self.length = len(source) if hasattr(source, "__len__") else None
        self._perm: tuple[int, torch.Tensor] | None = None
        self.failed = 0

    def __len__(self) -> int:  # the index space is unbounded; DataLoader only needs this for its own checks
        return 2**62

    def __getitem__(self, index: int) -> dict:
        """The sample with its index, or for a skipped one a marker {"skipped": [messages]} (see `collate`)."""
        reports: list[str] = []
        if hasattr(self.source, "on_skip"):  # the readers name what they skip; this may run in a worker process
            self.source.on_skip = reports.append
        try:
            if self.length is None:
                sample = self.source.sample(index)
            else:
                epoch, pos = divmod(index, self.length)
                if self._perm is None or self._perm[0] != epoch:
                    g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                    self._perm = (epoch, torch.randperm(self.length, generator=g))
                sample = self.source.sample(int(self._perm[1][pos]))
        except (OSError, ValueError) as e:
            self.failed += 1
            reports.append(f"skipping sample {index}: {e}")
            if skip_logged(self.failed):
                log.warning("%s", skip_log_line(self.failed, reports[-1]))
            sample = None
        if sample is None:
            return {"skipped": reports or [f"skipping sample {index}"]}
        return {**sample, "index": index}


class SkipReports(IterableDataset):
    """Streams `source`, attaching the messages of the samples it skipped to the next sample ("skipped"), or to a
    marker {"skipped": [...]} after the last one and whenever `flush_every` have piled up (so a long bad stretch
    reaches the training loop, and its bound on skips in a row, while it lasts). It runs where the data is read, a
    DataLoader worker process too, so the skips travel to the training loop with the batches (a worker's log
    records never reach it)."""

    def __init__(self, source: Any, flush_every: int = 64):
        self.source, self.flush_every = source, flush_every

    def __iter__(self):
        pending: list[str] = []
        marker: list[dict] = []

        def note(message: str) -> None:
            pending.append(message)
            if len(pending) >= self.flush_every:
                marker.append({"skipped": pending[:]})
                pending.clear()

        if hasattr(self.source, "on_skip"):
            self.source.on_skip = note
        for sample in self.source:
            yield from marker
            marker.clear()
            if pending:
                sample = {**sample, "skipped": pending[:]}
                pending.clear()
            yield sample
        yield from marker
        if pending:
            yield {"skipped": pending}


class UnreadableDataError(OSError):
    """The data gave no usable sample for too long (max_consecutive_skips in a row, every sample of the data, or a
    whole pass with nothing in it): the run stopped, naming the data. Its last checkpoint is intact."""


class SkipGuard:
    """Bounds the samples skipped in a row. Past `limit`, or for data of `total` samples past twice that many (which
    must include every one of them), it raises UnreadableDataError naming `source`: data that is all bad would
    otherwise be read again and again for ever. Streaming data reports in order; indexed data per batch, a batch
    with any good sample ending the bad stretch."""

    def __init__(self, source: str, limit: int, total: int | None = None):
        self.source, self.limit, self.total = source, limit, total
        self.run, self.last = 0, ""

    def read(self) -> None:
        """A good sample: the bad stretch is over."""
        self.run = 0

    def skipped(self, messages: list[str]) -> None:
        if not messages:
            return
        self.run += len(messages)
        self.last = messages[-1]
        if self.total and self.run >= min(self.limit, 2 * self.total):
            raise UnreadableDataError(
                f"none of the {self.total} samples of {self.source} could be read "
                f"({self.run} skipped in a row; the last: {self.last}); stopping"
            )
        if self.run >= self.limit:
            raise UnreadableDataError(
                f"{self.run} samples in a row could not be read from {self.source} "
                f"(max_consecutive_skips={self.limit}; the last: {self.last}); stopping: "
                f"check the data"
            )

    def end_of_pass(self, good: int, skipped: int) -> None:
        """A whole pass over streaming data is over: stop if it held no usable sample at all."""
        if good:
            return
        if not skipped:
            raise UnreadableDataError(
                f"{self.source} gave no samples in a whole pass (empty, or nothing in this "
                f"process's share of it); stopping"
            )
        raise UnreadableDataError(
            f"every sample of {self.source} in a whole pass was skipped ({skipped}; the last: {self.last}); stopping"
        )


class SkippedSamples:
    """What the readers skipped, as it reaches the training loop: counted for the progress bar, the first `named`
    written on the console (stderr, between the bar's updates), the rest summed up at the end; log.txt has all."""

    def __init__(self, show: bool, named: int = 5):
        self.show, self.named, self.count = show, named, 0

    def add(self, messages: list[str]) -> None:
        for message in messages:
            self.count += 1
            if self.show and self.count <= self.named:
                tqdm.write(f"warning: {message}", file=sys.stderr)

    def close(self) -> None:
        if self.show and self.count > self.named:
            tqdm.write(f"... and {self.count - self.named} more skipped samples (see log.txt)", file=sys.stderr)


class StepBatches(Sampler):
    """This process's share of every micro-batch, from `start_step` on: process r of W, micro-step m of A,
    per-process batch b takes indices s*G + m*b*W + r*b + [0, b)."""

    def __init__(self, start_step: int, max_steps: int, per_process: int, world: int, rank: int, accum: int):
        self.start, self.stop = start_step, max_steps
        self.b, self.world, self.rank, self.accum = per_process, world, rank, accum

    def __iter__(self):
        g = self.b * self.world * self.accum
        for step in range(self.start, self.stop):
            for micro in range(self.accum):
                first = step * g + micro * self.b * self.world + self.rank * self.b
                yield list(range(first, first + self.b))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def guarded(loader, guard: SkipGuard):
    """Indexed data's batches as they come, each reported to `guard`: one with a sample ends a bad stretch, an empty
    one (every sample skipped) lengthens it."""
    for batch in loader:
        if len(batch["index"]):
            guard.read()
        else:
            guard.skipped(batch.get("skipped", []))
        yield batch


def stream_batches(
    source, per_process: int, num_workers: int, first: int, stride: int, guard: SkipGuard
) -> Iterator[dict[str, Any]]:
    """Streaming data (folders, manifests, WebDataset shards) has no random access: each process reads its own
    split in order, and indices count samples as they come (resume restarts the stream). It ends only with
    the run, or with an UnreadableDataError when samples are skipped too long in a row or a whole pass has
    none."""
    loader = DataLoader(
        SkipReports(source),
        batch_size=per_process,
        num_workers=num_workers,
        collate_fn=lambda s: [x for x in s if x is not None],
    )
    skipped: list[str] = []
    while True:
        batches = good = skips = 0
        for batches, samples in enumerate(loader, start=1):  # every loader batch takes its share of indices
            for x in samples:  # in stream order: a sample's skips came before it
                news = x.pop("skipped", [])
                guard.skipped(news)
                skipped += news
                skips += len(news)
                if x:  # a lone skip marker is empty now
                    guard.read()
            samples = [x for x in samples if x]
            if not samples:
                continue
            start, good = first + (batches - 1) * stride, good + len(samples)
            batch = collate([{**x, "index": start + i} for i, x in enumerate(samples)])
            batch["skipped"], skipped = skipped, []
            yield batch
        guard.end_of_pass(good, skips)
        first += stride * batches


def training_batches(
    source, cfg: TrainConfig, start_step: int, per_process: int, world: int, rank: int
) -> Iterator[dict[str, Any]]:
    """Process `rank` of `world`'s micro-batches from `start_step` on, each with the messages of the samples its
    reader skipped: indexed data in step order (StepBatches), streaming data in stream order (stream_batches)."""
    if not hasattr(source, "sample"):
        first = start_step * cfg.batch_size + rank * per_process
        guard = SkipGuard(cfg.data, cfg.max_consecutive_skips)
        return stream_batches(source, per_process, cfg.num_workers, first, stride=per_process * world, guard=guard)
    data = IndexedData(source, cfg.seed)
    sampler = StepBatches(start_step, cfg.max_steps, per_process, world, rank, cfg.grad_accum)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate)
    return guarded(loader, SkipGuard(cfg.data, cfg.max_consecutive_skips, data.length))


def per_process_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """The micro-batch of one process: the global batch split over processes and accumulation steps, exactly."""
    if batch_size % (world * grad_accum):
        raise ValueError(
            f"batch_size {batch_size} must be divisible by processes x grad_accum = {world} x {grad_accum}"
        )
    return batch_size // (world * grad_accum)


def describe_data(source, spec: str, size: int) -> tuple[str, int | None]:
    """The line that names a run's data before step 1 (count, captions, their source, resolution), and how many of
    its samples have captions (None: unknown)."""
    about = source.describe() if hasattr(source, "describe") else {}
    samples, captioned = about.get("samples"), about.get("captioned")
    count = "a stream of samples" if samples is None else f"{samples} samples"
    with_captions = "" if captioned is None or samples is None else f", {captioned} with captions"
    where = f"; captions from {about['captions']}" if about.get("captions") else ""
    mix = f"; {about['mix']}" if about.get("mix") else ""
    return f"data {spec}: {count}{with_captions}{where}{mix}; images at {size} x {size} px", captioned
