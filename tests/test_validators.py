"""binlat.validators: the one answer every caller gives about integers, flags and seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from binlat.processes.common import check_sampling_args
from binlat.validators import (
    SEED_LIMIT,
    check_bool,
    check_int,
    check_seed,
    int_range,
    is_int,
    is_number,
    resolve_seed,
)


class ParseError(ValueError):
    """A caller's own ValueError subclass, as ConfigError and CheckpointError are."""


@pytest.mark.parametrize("value", [0, -3, 7, 2**70])
def test_is_int_takes_plain_integers(value):
    assert is_int(value)


@pytest.mark.parametrize("value", [True, False, 2.0, 2.7, "2", None, np.float32(2)])
def test_is_int_refuses_bools_floats_and_text(value):
    assert not is_int(value)


def test_is_number_takes_ints_and_floats_but_not_bools():
    assert is_number(3) and is_number(2.5) and is_number(math.inf)
    assert not is_number(True) and not is_number("3") and not is_number(None)


@pytest.mark.parametrize(
    ("low", "high", "words"), [(1, None, ">= 1"), (None, 9, "<= 9"), (0, 9, "in [0, 9]"), (None, None, "")]
)
def test_int_range_words(low, high, words):
    assert int_range(low, high) == words


def test_check_int_returns_an_integer_within_its_bounds():
    assert check_int("steps", 1, 1) == 1
    assert check_int("steps", 9, 1, 9) == 9
    assert check_int("offset", -5) == -5


@pytest.mark.parametrize(
    ("value", "low", "high", "message"),
    [
        (0, 1, None, "steps must be an integer >= 1, got 0"),
        (True, 1, None, "steps must be an integer >= 1, got True"),
        (2.0, 1, None, "steps must be an integer >= 1, got 2.0"),
        (math.nan, 1, None, "steps must be an integer >= 1, got nan"),
        ("3", 1, None, "steps must be an integer >= 1, got '3'"),
        (10, 0, 9, "steps must be an integer in [0, 9], got 10"),
        (10, None, 9, "steps must be an integer <= 9, got 10"),
        (None, None, None, "steps must be an integer, got None"),
    ],
)
def test_check_int_names_the_field_the_value_and_what_is_allowed(value, low, high, message):
    with pytest.raises(ValueError) as caught:
        check_int("steps", value, low, high)
    assert str(caught.value) == message


def test_check_int_adds_its_note_and_raises_the_callers_error():
    with pytest.raises(ParseError) as caught:
        check_int("height", 0, 1, note="pixels", error=ParseError)
    assert str(caught.value) == "height must be an integer >= 1 (pixels), got 0"


@pytest.mark.parametrize("value", [True, False])
def test_check_bool_takes_true_and_false(value):
    assert check_bool("progress", value) is value


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_check_bool_refuses_anything_else(value):
    with pytest.raises(ParseError, match=f"progress must be true or false, got {value!r}"):
        check_bool("progress", value, error=ParseError)


def test_check_seed_takes_every_seed_torch_takes():
    assert check_seed(0) == 0
    assert check_seed(SEED_LIMIT - 1) == SEED_LIMIT - 1
    assert check_seed(SEED_LIMIT - 4, count=4) == SEED_LIMIT - 4
    seed = check_seed(np.int64(7))  # numpy's integers become plain ones
    assert seed == 7 and type(seed) is int


@pytest.mark.parametrize("seed", [True, False, 2.7, 3.0, "3", None])
def test_check_seed_refuses_what_is_not_an_integer(seed):
    with pytest.raises(ValueError, match=f"^seed must be an integer, got {seed!r}$"):
        check_seed(seed)


@pytest.mark.parametrize(
    ("seed", "count", "most"),
    [(-1, 1, "2**64 - 1"), (SEED_LIMIT, 1, "2**64 - 1"), (SEED_LIMIT - 1, 2, "2**64 - 2")],
)
def test_check_seed_refuses_seeds_out_of_range_for_all_images(seed, count, most):
    with pytest.raises(ValueError) as caught:
        check_seed(seed, count)
    assert str(caught.value) == f"seed must be an integer in [0, {most}] (image i uses seed + i), got {seed}"


def test_resolve_seed_checks_a_given_seed_and_draws_one_when_none():
    assert resolve_seed(5, count=3) == 5
    drawn = resolve_seed(None)
    assert is_int(drawn) and 0 <= drawn < 2**31
    for bad in (True, 2.7, -1):
        with pytest.raises(ValueError, match="^seed must be an integer"):
            resolve_seed(bad)


@pytest.mark.parametrize("field", ["guidance_scale", "temperature", "rho"])
def test_sampling_settings_refuse_a_bool_as_a_number(field):
    """A flag is not a number here either: True is refused as a guidance scale, as it is as a strength."""
    with pytest.raises(ValueError, match=f"{field.replace('_', ' ')} must be a finite number.*got True"):
        check_sampling_args(**{field: True})
