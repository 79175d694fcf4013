"""WebDataset tar shards, read through webdataset's public pipeline (shard list, node/worker split, tar samples)."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from binlat import jsondepth
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


ALLOW_COMMANDS_FLAG = "--allow-data-commands"


def refuse_command_url(url: str) -> ValueError:
    """The error for a shard URL that would run a program, naming the one way to allow it."""
    scheme = url.split(":", 1)[0]
    what = "runs it as a shell command" if scheme == "pipe" else "opens it by running a program (curl, gsutil, ...)"
    return ValueError(
        f"shard {url!r}: webdataset {what}, and a data name never runs a program unless typed on the command line "
        f"with {ALLOW_COMMANDS_FLAG} (e.g. --data '{url}' {ALLOW_COMMANDS_FLAG}); configs, bundles, manifests and "
        f"shard lists cannot ask for it. Download the shards and name the local files instead"
    )


def expand_shards(urls: str | os.PathLike | Iterable[str | os.PathLike], *, allow_commands: bool = False) -> list[str]:
    """Shard list from a path/URL, a brace pattern (``shard-{000..009}.tar``), a glob,
    ``::``-separated lists of these, or a list of any of them. Local shards must exist and come back absolute, so
    that webdataset never reads a scheme into a file name.

    Every URL scheme webdataset opens runs a program (``pipe:`` a shell command; ``http:``, ``gs:``, ``hf:``, ...
    curl, gsutil and friends), so a URL is refused unless ``allow_commands`` says the user typed it (the CLI's
    ``--allow-data-commands``, which applies to ``--data`` alone)."""
    wds = _import_webdataset()
    items = [os.fspath(urls)] if isinstance(urls, (str, os.PathLike)) else [os.fspath(u) for u in urls]
    out: list[str] = []
    for item in items:
        for url in wds.SimpleShardList(item).urls:  # webdataset's own expansion of '::' lists and braces
            if _is_url(url):
                if not allow_commands:
                    raise refuse_command_url(url)
                out.append(url)
                continue
            local = url[len("file://") :] if url.startswith("file://") else url.removeprefix("file:")
            local = os.path.abspath(os.path.expanduser(local))
            if os.path.exists(local):
                out.append(local)
            elif glob.has_magic(local):
                matches = sorted(glob.glob(local))
                if not matches:
                    raise ValueError(f"shard glob {url!r} matches no files")
                out.extend(os.path.abspath(m) for m in matches)
            else:
                raise ValueError(f"shard {url!r} does not exist")
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


class WebDatasetShards(ImageTextDataset):
    """Samples streamed from WebDataset tar shards with the ``webdataset`` library.

    A sample is the members sharing a key: an image (jpg/jpeg/png/webp/bmp) and a
    caption, ``txt`` or ``json`` with a ``caption``/``text`` field (neither -> "").
    ``urls``: see :func:`expand_shards`; remote URLs (``pipe:``, ``http(s):``, ...) are refused unless
    ``allow_commands`` (they run programs), and then opened by ``webdataset.gopen``. Shards are split across ranks
    and DataLoader workers with ``webdataset.split_by_node`` / ``split_by_worker`` (so use at least as many
    shards as ranks x workers; note webdataset also honours RANK/WORLD_SIZE env vars).

    A shard that cannot be opened or is cut short does not stop the stream: the read
    error is logged and counted in ``skipped`` once per shard, and so is any incomplete
    or undecodable sample; the other shards continue. ``options``: those of
    :class:`~binlat.data.base.ImageTextDataset` (``shuffle`` orders the shards).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Iterable[str | os.PathLike],
        transform: Transform,
        *,
        allow_commands: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(transform, **options)
        self.allow_commands = allow_commands
        self.urls = expand_shards(urls, allow_commands=allow_commands)

    def describe(self) -> dict[str, Any]:
        """What a run reads (streamed: the count is unknown until read)."""
        return {
            "samples": None,
            "captioned": None,
            "shards": len(self.urls),
            "captions": "each sample's txt member (or json caption/text)",
        }

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.urls)} shards, first {self.urls[0]!r}, transform={self.transform!r})"

    def _raw_samples(self) -> Iterator[dict[str, Any]]:
        """The grouped members of this rank/worker's shards; read errors are logged, and counted once per shard."""
        wds = _import_webdataset()
        if not self.allow_commands:  # checked again here: urls is a public attribute
            for url in self.urls:
                if _is_url(url) or not os.path.isabs(url):
                    raise refuse_command_url(url) if _is_url(url) else ValueError(f"shard {url!r} is not absolute")
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
                meta = jsondepth.loads(raw["json"].decode("utf-8-sig"))
                value = first_of(meta, CAPTION_KEYS) if isinstance(meta, dict) else None
                caption = value.strip() if isinstance(value, str) else ""
            else:
                caption = ""
        except (UnicodeDecodeError, json.JSONDecodeError, jsondepth.JSONNestingError) as exc:
            self._skip(where, f"unreadable caption: {exc}")
            return None
        return self._make_sample(key, raw[image_key], caption, f"{key}.{image_key} in shard {raw.get('__url__')}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for raw in self._raw_samples():
            out = self._decode(raw)
            if out is not None:
                yield out


__all__ = ["ALLOW_COMMANDS_FLAG", "WDS_IMAGE_KEYS", "WebDatasetShards", "expand_shards", "refuse_command_url"]
