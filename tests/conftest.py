"""Helpers shared by several test files. A family of test files split from one (reliability, hostile files, train,
eval, cli, networks, processes) keeps what only its members share in tests/<family>_support.py instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Helper modules whose functions assert for the tests that call them (the reliability catalogue's Env.cli_fails and
# Env.server_fails, the hostile files' fails_at_run_time, the training tests' assert_same_tensors, the fault tests'
# assert_checkpoints_intact, the eval and CLI tests' one-line error checks, the serve and hostile-server tests'
# assert_error): rewrite their asserts as pytest does a test file's, so a failure shows the values.
pytest.register_assert_rewrite(
    "reliability_support",
    "hostile_files_support",
    "train_support",
    "eval_support",
    "cli_support",
    "serve_support",
    "hostile_server_support",
    "faults_support",
)


@pytest.fixture
def random_vgg16(tmp_path) -> Path:
    """A stand-in VGG16 feature stack (random weights under torchvision's key names) saved as safetensors: what
    the perceptual loss and LPIPS read, without downloading the real network."""
    from safetensors.torch import save_file

    from binlat.tokenizer.losses import _VGG16

    gen = torch.Generator().manual_seed(0)
    state, in_ch, index = {}, 3, 0
    for spec in _VGG16:
        if spec == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(spec, in_ch, 3, 3, generator=gen) * 0.05
        state[f"features.{index}.bias"] = torch.zeros(spec)
        in_ch, index = spec, index + 2
    path = tmp_path / "vgg.safetensors"
    save_file(state, str(path))
    return path
