"""WebDataset tar shards, read through webdataset's public pipeline (shard list, node/worker split, tar samples)."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Iterable, Iterator

from binlat.data.base import (
    CAPTION_KEYS,
    IMAGE_EXTENSIONS,
    ImageTextDataset,
    Transform,
    epoch_order,
    first_of,
    logger,
)

# WebDataset member suffixes tried for the image, in order.
WDS_IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")


def _import_webdataset():
    try:
        import webdataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("WebDataset shards need the 'webdataset' package: pip install webdataset") from exc
    return webdataset


def _is_url(s: str) -> bool:
    return bool(_URL_RE.match(s)) and not s.startswith("file:")


def expand_shards(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard list from a path/URL, a brace pattern (``shard-{000..009}.tar``), a glob,
    ``::``-separated lists of these, or a list of any of them. Local shards must exist."""
    wds = _import_webdataset()
    items = [os.fspath(urls)] if isinstance(urls, (str, os.PathLike)) else [os.fspath(u) for u in urls]
    out: list[str] = []
    for item in items:
        for url in wds.SimpleShardList(item).urls:  # webdataset's own expansion of '::' lists and braces
            if _is_url(url):
                out.append(url)
                continue
            local = url[len("file://") :] if url.startswith("file://") else url.removeprefix("file:")
            local = os.path.expanduser(local)
            if os.path.exists(local):
                out.append(local)
            elif glob.has_magic(local):
                matches = sorted(glob.glob(local))
                if not matches:
                    raise ValueError(f"shard glob {url!r} matches no files")
                out.extend(matches)
            else:
                raise ValueError(f"shard {url!r} does not exist")
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


class WebDatasetShards(ImageTextDataset):
    """Samples streamed from WebDataset tar shards with the ``webdataset`` library.

    A sample is the members sharing a key: an image (jpg/jpeg/png/webp/bmp) and a
    caption, ``txt`` or ``json`` with a ``caption``/``text`` field (neither -> "").
    ``urls``: see :func:`expand_shards`; remote URLs (``pipe:``, ``http(s):``, ...) are
    opened by ``webdataset.gopen``. Shards are split across ranks and DataLoader workers
    with ``webdataset.split_by_node`` / ``split_by_worker`` (so use at least as many
    shards as ranks x workers; note webdataset also honours RANK/WORLD_SIZE env vars).

    A shard that cannot be opened or is cut short does not stop the stream: the read
    error is logged and counted in ``skipped`` once per shard, and so is any incomplete
    or undecodable sample; the other shards continue. ``options``: those of
    :class:`~binlat.data.base.ImageTextDataset` (``shuffle`` orders the shards).
    """

    def __init__(
        self, urls: str | os.PathLike | Iterable[str | os.PathLike], transform: Transform, **options: Any
    ) -> None:
        super().__init__(transform, **options)
        self.urls = expand_shards(urls)

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.urls)} shards, first {self.urls[0]!r}, transform={self.transform!r})"

    def _raw_samples(self) -> Iterator[dict[str, Any]]:
        """The grouped members of this rank/worker's shards; read errors are logged, and counted once per shard."""
        wds = _import_webdataset()
        shard: dict[str, Any] = {"url": None, "failed": False}

        def note_shard(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            # webdataset opens a shard only once the previous one is read, so errors below belong to this one.
            for source in sources:
                shard.update(url=source["url"], failed=False)
                yield source

        def handler(exn: BaseException) -> bool:
            reason = exn.args[0] if getattr(exn, "args", None) else exn
            if shard["failed"]:  # follow-up errors of the same broken stream
                logger.debug("shard %s: further read error: %s: %s", shard["url"], type(exn).__name__, reason)
            else:
                shard["failed"] = True
                self._note_skip(f"shard {shard['url']}: read error, skipping the rest: {type(exn).__name__}: {reason}")
            return True

        # Every rank/worker sees the same (seeded) order, then takes its slice.
        order = epoch_order(len(self.urls), self.shuffle, self.seed, self.epoch)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([self.urls[i] for i in order]),
            wds.split_by_node,
            wds.split_by_worker,
            note_shard,
            wds.tarfile_to_samples(handler=handler),
        )
        yield from pipeline

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        key = str(raw.get("__key__"))
        where = f"{key} (shard {raw.get('__url__')})"
        image_key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
        if image_key is None:
            image_key = next(
                (k for k in raw if not k.startswith("__") and "." + k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None
            )
        if image_key is None:
            members = sorted(k for k in raw if not k.startswith("__"))
            self._skip(where, f"no image member (has {members})")
            return None
        try:
            if "txt" in raw:
                caption = raw["txt"].decode("utf-8-sig").strip()
            elif "json" in raw:
                meta = json.loads(raw["json"].decode("utf-8-sig"))
                value = first_of(meta, CAPTION_KEYS) if isinstance(meta, dict) else None
                caption = value.strip() if isinstance(value, str) else ""
            else:
                caption = ""
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._skip(where, f"unreadable caption: {exc}")
            return None
        return self._make_sample(key, raw[image_key], caption, f"{key}.{image_key} in shard {raw.get('__url__')}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for raw in self._raw_samples():
            out = self._decode(raw)
            if out is not None:
                yield out


__all__ = ["WDS_IMAGE_KEYS", "WebDatasetShards", "expand_shards"]
