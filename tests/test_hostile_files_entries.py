"""The files, values and runs catalogue of issue 29 names real entry points: each cli, api and data case of
tests/test_hostile_files_{runs,writes,values}.py feeds an entry point that tests/reliability_support.py derives
from the package, and the other cases are train or log ones."""

from __future__ import annotations

import test_hostile_files_runs
import test_hostile_files_values
import test_hostile_files_writes
from reliability_support import api_entry_points, cli_entry_points, data_entry_points

CATALOGUES = [test_hostile_files_runs.ENTRY_OF, test_hostile_files_writes.ENTRY_OF, test_hostile_files_values.ENTRY_OF]
ENTRY_OF = {name: entry for entries in CATALOGUES for name, entry in entries.items()}


def test_entries_are_entry_points() -> None:
    assert len(ENTRY_OF) == sum(map(len, CATALOGUES)), "a case name is registered in two catalogue files"
    required = {"cli": cli_entry_points(), "api": api_entry_points(), "data": data_entry_points()}
    for name, entry in ENTRY_OF.items():
        surface = name.split("-")[0]
        assert surface in ("cli", "api", "data", "train", "log"), name
        assert entry in required.get(surface, {entry}), f"case {name}: {entry!r} is not a {surface} entry point"
