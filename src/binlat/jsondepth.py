"""JSON with its nesting bounded before it is parsed.

`json.loads` recurses once per nested array or object: thousands of levels are a RecursionError (not a
JSONDecodeError, so callers that catch only that fail with an internal error), and a few hundred parse but may
break whatever walks the result next. `loads` measures the depth first, at C speed (no Python loop per character:
a 16 MB body of brackets costs a fraction of a second), and refuses anything deeper than `max_depth` with a
JSONNestingError, a ValueError naming the limit.
"""

from __future__ import annotations

import json
from typing import Any

MAX_FILE_DEPTH = 64  # config files, bundle indexes, manifests: a few levels deep in practice

_SLICE = 1 << 20  # bytes summed at a time (a few MB of temporaries, whatever the input size)


class JSONNestingError(ValueError):
    """JSON nested deeper than the reader accepts."""


def check_depth(data: str | bytes, max_depth: int) -> None:
    r"""Raise JSONNestingError if `data`, read as JSON, nests arrays and objects deeper than `max_depth`.

    Escapes are blanked first: a backslash run pairs up from its left as the parser reads it, so replacing every
    `\\` and then every `\"` leaves only the quotes that open and close strings. A byte is inside a string
    when an odd number of quotes precede it; the depth is the running count of opening minus closing brackets
    outside strings. Both are summed with numpy, a slice at a time. Unbalanced brackets are left to the parser,
    which reports them as invalid JSON."""
    brackets = data.count("[") + data.count("{") if isinstance(data, str) else data.count(b"[") + data.count(b"{")
    if brackets <= max_depth:  # the usual case, decided without a scan
        return
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    import numpy as np

    raw = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    level, in_string = 0, 0
    for start in range(0, len(raw), _SLICE):
        chunk = np.frombuffer(raw, np.uint8, min(_SLICE, len(raw) - start), start)
        inside = np.bitwise_xor.accumulate((chunk == ord('"')).view(np.uint8)) ^ in_string
        in_string = int(inside[-1])
        steps = ((chunk == ord("[")) | (chunk == ord("{"))).astype(np.int32)
        steps -= (chunk == ord("]")) | (chunk == ord("}"))
        steps[inside.view(bool)] = 0
        running = np.cumsum(steps) + level
        if running.max() > max_depth:
            raise too_deep(max_depth)
        level = int(running[-1])


def too_deep(max_depth: int) -> JSONNestingError:
    return JSONNestingError(
        f"JSON nested deeper than {max_depth} levels of arrays and objects (at most {max_depth} are read)"
    )


def loads(data: str | bytes, max_depth: int = MAX_FILE_DEPTH) -> Any:
    """`json.loads(data)` for JSON nested at most `max_depth` deep, else JSONNestingError. Invalid JSON is
    json.JSONDecodeError as usual."""
    check_depth(data, max_depth)
    try:
        return json.loads(data)
    except RecursionError:  # unbalanced opening brackets by the thousand: invalid, but the parser recurses first
        raise too_deep(max_depth) from None
