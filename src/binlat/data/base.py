"""What every real-image reader shares: the sample format, the split across ranks and workers, skips.

Every dataset yields the common sample format ``{"image": float tensor [3, S, S] in
[-1, 1], "caption": str, "key": str}`` (an empty caption is an unconditional sample)
and batches with :func:`binlat.data.collate.collate`.

The datasets are ``IterableDataset``s: one pass over the data per ``iter()``, split
across DataLoader workers and, when ``torch.distributed`` is initialised, across ranks.
Corrupt or unreadable samples are skipped, never stop iteration, are counted in
``skipped`` (per process / worker) and logged as a warning on the ``binlat.data``
logger naming the sample key and the reason; ``on_skip``, when set, also receives
each such message in the process that read the data (the trainer uses it to carry
skips from DataLoader workers to the console).

``set_epoch(e)`` (before creating the DataLoader iterator) changes the shuffle order
(``shuffle=True``) and the random crops/flips of a seeded :class:`ImageTransform`;
both are functions of (seed, epoch, key) only, whatever the number of workers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from binlat.data.transforms import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageTransform, load_image

logger = logging.getLogger("binlat.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_KEYS: tuple[str, ...] = ("caption", "text")

Transform = Callable[..., torch.Tensor]
SKIPS_NAMED = 20  # per reader: the first skips are logged one by one, then one line at each power of ten


def skip_logged(count: int) -> bool:
    """Whether the `count`-th skip of a reader is logged: the first SKIPS_NAMED, then the 100th, 1,000th, ... so
    data that is mostly bad cannot fill the disk with log lines."""
    if count <= SKIPS_NAMED:
        return True
    while count % 10 == 0:
        count //= 10
    return count == 1


def skip_log_line(count: int, message: str) -> str:
    return (
        message
        if count <= SKIPS_NAMED
        else f"{message} ({count} samples skipped so far by this reader; "
        f"after the first {SKIPS_NAMED} only every power of ten is logged)"
    )


def first_of(obj: dict[str, Any], names: Sequence[str]) -> Any:
    """The value of the first of ``names`` that ``obj`` holds and is not None, else None."""
    for n in names:
        if obj.get(n) is not None:
            return obj[n]
    return None


# ---------------------------------------------------------------- sharding


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def global_shard() -> tuple[int, int]:
    """(index, count) of this reader among all ranks x DataLoader workers."""
    rank, world = _rank_world()
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world * workers


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """0..n-1, or with ``shuffle`` a permutation of it that depends on (seed, epoch) only."""
    order = list(range(n))
    if shuffle:
        random.Random(f"binlat.data.shuffle/{seed}/{epoch}").shuffle(order)
    return order


# ---------------------------------------------------------------- readers


class ImageTextDataset(IterableDataset):
    """Shared skip/count/log and transform handling."""

    def __init__(
        self,
        transform: Transform,
        *,
        shuffle: bool = False,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        super().__init__()
        if not callable(transform):
            raise TypeError(f"transform must be callable (e.g. ImageTransform(size)), got {transform!r}")
        self.transform = transform
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.max_pixels = max_pixels
        self.min_side = int(min_side)
        self.epoch = 0
        self.skipped = 0
        self.on_skip: Callable[[str], None] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _skip(self, key: str, reason: object) -> None:
        self._note_skip(f"skipping sample {key}: {reason}")

    def _note_skip(self, message: str) -> None:
        """Count, log and report one skip (a sample, or the rest of a cut shard)."""
        self.skipped += 1
        if skip_logged(self.skipped):
            logger.warning("%s", skip_log_line(self.skipped, message))
        if self.on_skip is not None:
            self.on_skip(message)

    def _apply_transform(self, image: Image.Image, key: str) -> torch.Tensor:
        rng_for = getattr(self.transform, "rng_for", None)
        if callable(rng_for):
            return self.transform(image, rng=rng_for(key, self.epoch))
        return self.transform(image)

    def _make_sample(self, key: str, source: Any, caption: str, name: str) -> dict[str, Any] | None:
        """Decode + transform one image; None (after counting and logging) if unusable."""
        # JPEG draft decoding only for our own transform, whose resize it matches.
        draft = (self.transform.size,) * 2 if isinstance(self.transform, ImageTransform) else None
        try:
            image = load_image(source, self.max_pixels, self.min_side, name=name, draft_size=draft)
            tensor = self._apply_transform(image, key)
        except (ValueError, OSError) as exc:  # ImageLoadError is a ValueError
            self._skip(key, exc)
            return None
        return {"image": tensor, "caption": caption, "key": key}


class IndexedImageDataset(ImageTextDataset):
    """A reader whose samples are listed up front (a folder scan, a manifest): subclasses give ``__len__`` and
    ``sample(index)`` (None for a skipped one), which the trainer also reads by index. Iteration takes this
    rank/worker's slice of the seeded epoch order."""

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, index: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = global_shard()
        for index in epoch_order(len(self), self.shuffle, self.seed, self.epoch)[shard::shards]:
            out = self.sample(index)
            if out is not None:
                yield out
