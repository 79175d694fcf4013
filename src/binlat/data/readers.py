"""Real-image text-to-image datasets and the CLI's data SPEC.

Every dataset yields the common sample format ``{"image": float tensor [3, S, S] in
[-1, 1], "caption": str, "key": str}`` (an empty caption is an unconditional sample)
and batches with :func:`collate`.

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

import csv
import glob
import io
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from binlat.data.transforms import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLoadError, ImageTransform, load_image

logger = logging.getLogger("binlat.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# WebDataset member suffixes tried for the image, in order.
WDS_IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_KEYS: tuple[str, ...] = ("caption", "text")
PATH_KEYS: tuple[str, ...] = ("path", "image")

Transform = Callable[..., torch.Tensor]


# ---------------------------------------------------------------- sharding helpers


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _global_shard() -> tuple[int, int]:
    """(index, count) of this reader among all ranks x DataLoader workers."""
    rank, world = _rank_world()
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world * workers


def _epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"binlat.data.shuffle/{seed}/{epoch}").shuffle(order)
    return order


# ---------------------------------------------------------------- base


class _ImageTextDataset(IterableDataset):
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
        logger.warning("%s", message)
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


def _read_caption(path: Path) -> str:
    """Stripped UTF-8 text of ``path``, or "" if it does not exist.

    Raises ``UnicodeDecodeError`` / ``OSError`` for unreadable captions.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return data.decode("utf-8-sig").strip()


# ---------------------------------------------------------------- image folder


class ImageFolderDataset(_ImageTextDataset):
    """Every image under ``root`` (recursive; .jpg .jpeg .png .webp .bmp, any case;
    hidden files and folders skipped), in sorted path order, each captioned by a
    same-named ``.txt`` beside it (stripped UTF-8; missing -> "" i.e. unconditional).

    Keys are the image paths relative to ``root`` (POSIX separators, with extension).
    A caption that is not valid UTF-8 skips its sample.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform,
        *,
        shuffle: bool = False,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__(transform, shuffle=shuffle, seed=seed, max_pixels=max_pixels, min_side=min_side)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        self.files: list[Path] = self._scan(self.root, exts)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(exts))}) found under {self.root}")

    @staticmethod
    def _scan(root: Path, exts: set[str]) -> list[Path]:
        found: list[str] = []
        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # symlink loop
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                    found.append(os.path.relpath(os.path.join(dirpath, name), root))
        return [root / rel for rel in sorted(found, key=lambda p: Path(p).as_posix())]

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self.files)} images, transform={self.transform!r})"

    def __len__(self) -> int:
        return len(self.files)

    def key_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def sample(self, index: int) -> dict[str, Any] | None:
        """Sample ``index`` of the sorted file list, or None if it is skipped."""
        path = self.files[index]
        key = self.key_of(path)
        try:
            caption = _read_caption(path.with_suffix(".txt"))
        except UnicodeDecodeError as exc:
            self._skip(key, f"caption {path.with_suffix('.txt')} is not valid UTF-8 ({exc.reason} at byte {exc.start})")
            return None
        except OSError as exc:
            self._skip(key, f"cannot read caption {path.with_suffix('.txt')}: {exc}")
            return None
        return self._make_sample(key, path, caption, str(path))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = _global_shard()
        for index in _epoch_order(len(self.files), self.shuffle, self.seed, self.epoch)[shard::shards]:
            out = self.sample(index)
            if out is not None:
                yield out


# ---------------------------------------------------------------- manifest


def _first(obj: dict[str, Any], names: Sequence[str]) -> Any:
    for n in names:
        if obj.get(n) is not None:
            return obj[n]
    return None


class ManifestDataset(_ImageTextDataset):
    """Images listed in a JSONL or CSV manifest.

    JSONL: one object per non-blank line with ``path`` (or ``image``) and ``caption``
    (or ``text``; missing/null -> ""). CSV: a header row with a ``path``/``image`` and
    optionally a ``caption``/``text`` column. An optional ``key``/``id`` field names
    the sample (default: the path as written). Relative paths resolve against the
    manifest's folder. A malformed entry raises ``ValueError`` naming its line at
    construction; a missing or corrupt image is skipped (and counted) at iteration.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Transform,
        *,
        shuffle: bool = False,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        super().__init__(transform, shuffle=shuffle, seed=seed, max_pixels=max_pixels, min_side=min_side)
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"manifest {self.path} does not exist")
        suffix = self.path.suffix.lower()
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"manifest {self.path} is not valid UTF-8: {exc}") from exc
        if suffix == ".jsonl":
            raw = self._parse_jsonl(text)
        elif suffix == ".csv":
            raw = self._parse_csv(text)
        else:
            raise ValueError(f"manifest {self.path}: expected a .jsonl or .csv file")
        if not raw:
            raise ValueError(f"manifest {self.path} lists no images")
        base = self.path.parent
        # (key, resolved image path, caption)
        self.entries: list[tuple[str, Path, str]] = []
        for key, rel, caption in raw:
            p = Path(os.path.expanduser(rel))
            self.entries.append((key, p if p.is_absolute() else base / p, caption))

    def __repr__(self) -> str:
        return f"ManifestDataset({str(self.path)!r}, {len(self.entries)} entries, transform={self.transform!r})"

    def __len__(self) -> int:
        return len(self.entries)

    def _bad(self, line: int, why: str) -> ValueError:
        return ValueError(f"manifest {self.path} line {line}: {why}")

    def _entry(self, line: int, obj: dict[str, Any]) -> tuple[str, str, str]:
        rel = _first(obj, PATH_KEYS)
        if not isinstance(rel, str) or not rel.strip():
            raise self._bad(line, f"needs a non-empty string 'path' or 'image' field, got {obj!r}")
        caption = _first(obj, CAPTION_KEYS)
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise self._bad(line, f"caption must be a string, got {caption!r}")
        key = _first(obj, ("key", "id"))
        return (rel.strip() if key is None else str(key)), rel.strip(), caption.strip()

    def _parse_jsonl(self, text: str) -> list[tuple[str, str, str]]:
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise self._bad(lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise self._bad(lineno, f"expected a JSON object, got {type(obj).__name__}")
            out.append(self._entry(lineno, obj))
        return out

    def _parse_csv(self, text: str) -> list[tuple[str, str, str]]:
        reader = csv.reader(io.StringIO(text, newline=""))
        out = []
        try:
            header = next(reader, None)
            if header is None:
                return out
            columns = [h.strip().lower() for h in header]
            if not any(k in columns for k in PATH_KEYS):
                raise self._bad(1, f"CSV header needs a 'path' or 'image' column, got {header}")
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(columns):
                    raise self._bad(reader.line_num, f"expected {len(columns)} fields, got {len(row)}: {row}")
                out.append(self._entry(reader.line_num, {c: v for c, v in zip(columns, row) if v != ""}))
        except csv.Error as exc:
            raise self._bad(reader.line_num, f"malformed CSV: {exc}") from exc
        return out

    def sample(self, index: int) -> dict[str, Any] | None:
        """Entry ``index`` of the manifest, or None if it is skipped."""
        key, path, caption = self.entries[index]
        return self._make_sample(key, path, caption, str(path))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = _global_shard()
        for index in _epoch_order(len(self.entries), self.shuffle, self.seed, self.epoch)[shard::shards]:
            out = self.sample(index)
            if out is not None:
                yield out


# ---------------------------------------------------------------- webdataset shards

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
    expand_urls = _import_webdataset().shardlists.expand_urls
    items = [os.fspath(urls)] if isinstance(urls, (str, os.PathLike)) else [os.fspath(u) for u in urls]
    out: list[str] = []
    for item in items:
        for url in expand_urls(item):
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


class WebDatasetShards(_ImageTextDataset):
    """Samples streamed from WebDataset tar shards with the ``webdataset`` library.

    A sample is the members sharing a key: an image (jpg/jpeg/png/webp/bmp) and a
    caption, ``txt`` or ``json`` with a ``caption``/``text`` field (neither -> "").
    ``urls``: see :func:`expand_shards`; remote URLs (``pipe:``, ``http(s):``, ...) are
    opened by ``webdataset.gopen``. Shards are split across ranks and DataLoader workers
    with ``webdataset.split_by_node`` / ``split_by_worker`` (so use at least as many
    shards as ranks x workers; note webdataset also honours RANK/WORLD_SIZE env vars).

    A shard that cannot be opened or is cut short does not stop the stream: the read
    error is logged and counted in ``skipped`` once per shard, and so is any incomplete
    or undecodable sample; the other shards continue.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Iterable[str | os.PathLike],
        transform: Transform,
        *,
        shuffle: bool = False,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        super().__init__(transform, shuffle=shuffle, seed=seed, max_pixels=max_pixels, min_side=min_side)
        self.urls = expand_shards(urls)

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.urls)} shards, first {self.urls[0]!r}, transform={self.transform!r})"

    def _my_shards(self) -> list[str]:
        wds = _import_webdataset()
        order = _epoch_order(len(self.urls), self.shuffle, self.seed, self.epoch)
        # Every rank/worker sees the same (seeded) order, then takes its slice.
        return list(wds.split_by_worker(wds.split_by_node([self.urls[i] for i in order])))

    def _raw_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """The grouped members of one shard; read errors are logged, and counted once."""
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        failed = False

        def handler(exn: BaseException) -> bool:
            nonlocal failed
            reason = exn.args[0] if getattr(exn, "args", None) else exn
            if failed:  # follow-up errors of the same broken stream
                logger.debug("shard %s: further read error: %s: %s", url, type(exn).__name__, reason)
            else:
                failed = True
                self._note_skip(f"shard {url}: read error, skipping the rest: {type(exn).__name__}: {reason}")
            return True

        for opened in url_opener([{"url": url}], handler=handler):
            try:
                yield from group_by_keys(tar_file_expander([opened], handler=handler), handler=handler)
            finally:
                try:
                    opened["stream"].close()
                except Exception as exc:  # noqa: BLE001 - e.g. a pipe: command that failed
                    handler(exc)

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
                value = _first(meta, CAPTION_KEYS) if isinstance(meta, dict) else None
                caption = value.strip() if isinstance(value, str) else ""
            else:
                caption = ""
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._skip(where, f"unreadable caption: {exc}")
            return None
        return self._make_sample(key, raw[image_key], caption, f"{key}.{image_key} in shard {raw.get('__url__')}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for url in self._my_shards():
            for raw in self._raw_samples(url):
                out = self._decode(raw)
                if out is not None:
                    yield out


# ---------------------------------------------------------------- collate and SPEC


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for every binlat dataset: stacks ``image``, lists
    ``caption`` and any other field present (``key``, ``scene``)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
    }
    for name in samples[0]:
        if name not in out and all(name in s for s in samples):
            out[name] = [s[name] for s in samples]
    return out


SPEC_FORMS = (
    "'shapes' or 'shapes:seed=N' (procedural shapes), an existing image folder (images + same-named .txt "
    "captions), a .jsonl/.csv manifest, or WebDataset .tar shards (path, brace pattern "
    "'shard-{000..009}.tar', glob, or URL such as pipe:/http:)"
)


def _shapes_seed(spec: str, seed: int) -> int | None:
    """The seed of a shapes spec, or None if ``spec`` is not one."""
    if spec == "shapes":
        return seed
    if not spec.startswith("shapes:"):
        return None
    for part in spec[len("shapes:") :].split(","):
        name, eq, value = part.partition("=")
        if name.strip() != "seed" or not eq:
            raise ValueError(f"bad shapes spec {spec!r}: only 'shapes:seed=N' is accepted")
        try:
            seed = int(value)
        except ValueError as exc:
            raise ValueError(f"bad shapes spec {spec!r}: seed must be an integer") from exc
    return seed


def _is_tar_spec(spec: str) -> bool:
    low = spec.lower()
    return ".tar" in low or low.endswith(".tgz")


def make_dataset(
    spec: str,
    size: int,
    seed: int = 0,
    random_crop: bool = True,
    hflip: bool = False,
    *,
    shuffle: bool = False,
    include_held_out: bool = False,
) -> IterableDataset:
    """The dataset for the CLI's data SPEC (see ``SPEC_FORMS``) at ``size`` px.

    ``seed`` seeds the shapes stream, or the crops/flips (and with ``shuffle`` the order)
    of real images. Shapes ignore ``random_crop`` and ``hflip`` (a flip would contradict
    left/right captions). ``include_held_out`` lets the shapes stream render the held-out
    compositions (the tokenizer's stream: a codec reads no captions); generators never see them.
    Unknown or nonexistent specs raise ``ValueError``.
    """
    spec = str(spec).strip()
    shapes_seed = _shapes_seed(spec, seed)
    if shapes_seed is not None:
        from binlat.data.shapes import ShapesStream

        if hflip:
            logger.warning("hflip ignored for the shapes data: it would contradict left/right captions")
        return ShapesStream(size=size, seed=shapes_seed, exclude_held_out=not include_held_out)
    if not spec:
        raise ValueError(f"empty data spec; expected {SPEC_FORMS}")
    transform = ImageTransform(size, random_crop=random_crop, hflip=hflip, seed=seed)
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        return ImageFolderDataset(expanded, transform, shuffle=shuffle, seed=seed)
    if spec.lower().endswith((".jsonl", ".csv")):
        if not os.path.isfile(expanded):
            raise ValueError(f"data spec {spec!r}: manifest file not found; expected {SPEC_FORMS}")
        return ManifestDataset(expanded, transform, shuffle=shuffle, seed=seed)
    if _is_tar_spec(spec):
        try:
            return WebDatasetShards(spec, transform, shuffle=shuffle, seed=seed)
        except ValueError as exc:
            raise ValueError(f"data spec {spec!r}: {exc}; expected {SPEC_FORMS}") from exc
    if os.path.exists(expanded):
        raise ValueError(f"data spec {spec!r} is a file that is neither a manifest nor a shard; expected {SPEC_FORMS}")
    raise ValueError(f"unknown data spec {spec!r} (no such file or directory); expected {SPEC_FORMS}")


__all__ = [
    "IMAGE_EXTENSIONS",
    "SPEC_FORMS",
    "ImageFolderDataset",
    "ImageLoadError",
    "ManifestDataset",
    "WebDatasetShards",
    "collate",
    "expand_shards",
    "make_dataset",
]
