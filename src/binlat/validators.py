"""Checks of plain values that many callers make, written once so that every caller gives the same answer: an
integer (never a bool or a float), a bool, a seed (the pipeline, editing and the server resolve seeds alike). A
check returns the value or raises an error naming the field, the bad value and what is allowed (ValueError unless
the caller names a subclass, such as a ConfigError)."""

from __future__ import annotations

import numbers
import secrets
from typing import Any, TypeGuard

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below this


def is_int(value: Any) -> TypeGuard[int]:
    """Whether `value` is an int and not a bool: bool is a subclass of int, but True is never meant as a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether `value` is an int or a float and not a bool (whether it is finite is the caller's question)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_range(low: int | None, high: int | None) -> str:
    """The integers from `low` to `high` in words: ">= 1", "<= 9", "in [0, 9]", or "" when both are None."""
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def check_int(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    note: str = "",
    error: type[ValueError] = ValueError,
) -> int:
    """`value` when it is an integer (not a bool, not a float such as 2.0) from `low` to `high` inclusive (None:
    no bound on that side); otherwise an `error` such as "steps must be an integer >= 1, got 0", with `note` in
    brackets after the range when given."""
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        allowed = " ".join(part for part in ("an integer", int_range(low, high), f"({note})" if note else "") if part)
        raise error(f"{name} must be {allowed}, got {value!r}")
    return value


def check_bool(name: str, value: Any, *, error: type[ValueError] = ValueError) -> bool:
    """`value` when it is True or False; otherwise an `error` (1, 0 and "yes" are not taken as flags)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {value!r}")
    return value


def check_seed(seed: Any, count: int = 1) -> int:
    """`seed` as the first of `count` consecutive seeds (image i uses seed + i): an integer with seed, ...,
    seed + count - 1 all in [0, 2**64), else a ValueError saying so. A bool or a float such as 2.7 is refused, not
    rounded; an integer of another kind (numpy's) is taken, as it becomes a plain int here before any use."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= SEED_LIMIT - max(count, 1):
        most = f"2**64 - {count}" if count > 1 else "2**64 - 1"
        raise ValueError(f"seed must be an integer in [0, {most}] (image i uses seed + i), got {seed}")
    return seed


def resolve_seed(seed: Any, count: int = 1) -> int:
    """The given seed, checked as the first of `count` consecutive ones (`check_seed`), or a fresh random one
    when None (below 2**31, so that it is short enough to read back and type in)."""
    if seed is None:
        return secrets.randbelow(2**31)
    return check_seed(seed, count)
