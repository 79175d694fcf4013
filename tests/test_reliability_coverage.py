"""The reliability catalogue is complete: every entry point of the package has at least one case.

The entry points are derived from the package itself (tests/reliability_support.py): each command of the `binlat`
parser, the Pipeline's and every exported model's loading and saving, the editing and official functions a user
hands a file or an image, the server's routes, and the data readers. The cases are those of the catalogue files,
tests/test_reliability_{cli_generate,cli_models,cli_commands,api,data,server}.py; each case's entry must also be a
real entry point of its surface.
"""

from __future__ import annotations

import test_reliability_api
import test_reliability_cli_commands
import test_reliability_cli_generate
import test_reliability_cli_models
import test_reliability_data
import test_reliability_server
from reliability_support import (  # noqa: F401
    api_entry_points,
    cli_entry_points,
    client,
    data_entry_points,
    encoder,
    pipe,
    server_entry_points,
)

CATALOGUES = [
    test_reliability_cli_generate.ENTRY_OF,
    test_reliability_cli_models.ENTRY_OF,
    test_reliability_cli_commands.ENTRY_OF,
    test_reliability_api.ENTRY_OF,
    test_reliability_data.ENTRY_OF,
    test_reliability_server.ENTRY_OF,
]
ENTRY_OF = {name: entry for entries in CATALOGUES for name, entry in entries.items()}


def test_catalogue_is_complete(client) -> None:
    assert len(ENTRY_OF) == sum(map(len, CATALOGUES)), "a case name is registered in two catalogue files"
    required = {
        "cli": cli_entry_points(),
        "api": api_entry_points(),
        "server": server_entry_points(client.app),
        "data": data_entry_points(),
    }
    # the derivations find what they are meant to (an empty or broken one would make the check below vacuous)
    assert {"binlat generate", "binlat train", "binlat eval fid", "binlat serve"} <= required["cli"]
    assert {
        "Pipeline.__call__",
        "Pipeline.from_pretrained",
        "BinaryTokenizer.from_pretrained",
        "editing.edit",
        "editing.interpolate",
        "editing.continue_ar",
        "official.convert_official",
    } <= required["api"]
    assert {"POST /v1/generate", "POST /v1/edit", "POST /v1/reconstruct", "GET /healthz"} <= required["server"]
    assert {"make_dataset", "ImageFolderDataset", "ManifestDataset", "WebDatasetShards"} <= required["data"]
    for name, entry in ENTRY_OF.items():
        surface = name.split("-")[0]
        assert entry in required.get(surface, set()), f"case {name}: {entry!r} is not a {surface} entry point"
    covered = set(ENTRY_OF.values())
    missing = {surface: sorted(entries - covered) for surface, entries in required.items() if entries - covered}
    assert not missing, f"entry points without a case: {missing}"
