"""Safe file handling: atomic writes, strict safetensors loading with errors that name the problem, weights checked
for their values, and append-only JSONL logs that a killed writer cannot break."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("binlat.io")
# What weights may be stored as: fp8 (and other sub-16-bit formats), integers and booleans are refused, not cast.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class WeightsError(ValueError):
    """Weights that cannot be loaded: missing, corrupt, or not matching the model."""


# Bounds on the files a user names, checked before they are read (issue 29: /dev/zero as a manifest's image reached
# 7 GB): images up to 256 MiB, text (configs, manifests, prompt lists, captions) up to 64 MiB.
MAX_IMAGE_BYTES = 256 * 2**20
MAX_TEXT_BYTES = 64 * 2**20


class FileRefused(OSError):
    """A path that is not a regular file (a device, a FIFO, a directory), or one larger than its bound."""


def read_bounded(path: str | os.PathLike[str], limit: int = MAX_TEXT_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes, checked before reading: a device (/dev/zero), a FIFO
    (opened without blocking), a socket or a directory is a FileRefused naming it, as is a file above the limit (or
    one that grows past it while read). Errors opening it (missing, no permission) are raised as they are."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "not a regular file"
            )
            raise FileRefused(f"{what} {path} is {kind}, not a regular file: refused before reading")
        if st.st_size > limit:
            raise FileRefused(
                f"{what} {path} is {st.st_size} bytes, over the {limit // 2**20} MiB limit for a "
                f"{what}: refused before reading"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FileRefused(f"{what} {path} grew past the {limit // 2**20} MiB limit for a {what} while read")
        return data
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one rename,
    so a reader never sees a half-written directory and a crash leaves the old one intact."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like a plain mkdir
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(tmp: str | Path) -> None:
    """mkstemp makes 0600 files; give the final file the mode a plain open() would."""
    os.chmod(tmp, 0o666 & ~_umask())


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _publishable(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_file(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic_file(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file; a missing, truncated or corrupt file is a WeightsError."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise WeightsError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None


def check_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    name: Callable[[str], str] = str,
    allow_nonfinite: bool = False,
) -> None:
    """Raise WeightsError naming every missing, unexpected or wrongly shaped key (shown through `name`, e.g. as
    the key the user's file calls it), then the first tensor whose values cannot be loaded (`check_values`)."""
    _check_keys(model, state, source, name)
    check_values(state, source, name, allow_nonfinite)


def check_values(
    state: Mapping[str, torch.Tensor], source: str, name: Callable[[str], str] = str, allow_nonfinite: bool = False
) -> None:
    """Raise WeightsError naming the first tensor (in key order) that is not stored as float32, float16, bfloat16
    or float64 (an integer, boolean or fp8 tensor would be cast silently), or, unless `allow_nonfinite`, that holds
    NaN or infinite values (which give black or noise images with no error)."""
    for key in sorted(state):
        tensor = state[key]
        if tensor.dtype not in WEIGHT_DTYPES:
            raise WeightsError(
                f"{source}: tensor {name(key)} is stored as {str(tensor.dtype).removeprefix('torch.')}"
                f"; weights must be float32, float16 or bfloat16 (nothing is cast from integers, "
                f"booleans or fp8)"
            )
        if not allow_nonfinite and not _all_finite(tensor):
            flat = tensor.reshape(-1)
            nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
            raise WeightsError(
                f"{source}: tensor {name(key)} holds {nan} NaN and {inf} infinite value(s) of "
                f"{flat.numel()}; refusing non-finite weights (allow_nonfinite=True, or "
                f"--allow-nonfinite-weights, loads them anyway)"
            )


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """In slices, so a memory-mapped gigabyte tensor costs a small temporary, not one byte per element at once."""
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _check_keys(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, name: Callable[[str], str]
) -> None:
    expected = model.state_dict()
    missing = sorted(name(k) for k in set(expected) - set(state))
    unexpected = sorted(name(k) for k in set(state) - set(expected))
    wrong = sorted(
        f"{name(k)}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_short(wrong)}")
    if problems:
        raise WeightsError(
            f"{source}: weights do not match the model config: "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', … (+{len(items) - limit} more)' if len(items) > limit else ''}]"


# --- append-only JSONL logs (metrics.jsonl, metadata.jsonl, probes.jsonl) ---------------------------------------
def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append one line per row under an exclusive lock, in one write, and fsync: concurrent writers (two generate
    runs into one folder) never interleave. A torn last line, left by a writer killed mid-write, is cut off first
    (with a warning naming the file), so it never becomes a bad line in the middle of the log."""
    path = Path(path)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            keep = _complete_length(fd, size)
            os.ftruncate(fd, keep)
            log.warning("%s: cut off a torn last line (%d bytes, left by an interrupted write)", path, size - keep)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def _complete_length(fd: int, size: int, block: int = 1 << 16) -> int:
    """Bytes up to and including the file's last newline (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def read_jsonl(path: str | Path, numbered: bool = False) -> list[Any]:
    """Every row of an append-only JSONL log (blank lines skipped), with `numbered` as (line number, row) pairs.
    An unparseable last line is what a writer killed mid-write leaves: it is skipped with a warning naming the file.
    An unparseable line before it is damage: a ValueError naming the file and the line."""
    path = Path(path)
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as editors may add
    lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))
            rows.append((n, row) if numbered else row)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else f"not UTF-8 at byte {e.start}"
            if i < len(lines) - 1:
                raise ValueError(f"{path} line {n}: not valid JSON ({why}); only a torn last line is skipped") from None
            log.warning("%s line %d: skipped a torn last line (an interrupted write): %.60r", path, n, line)
    return rows
