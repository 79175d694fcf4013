"""train.optimizer: which parameters Muon steps, and that the pair is one optimiser to the trainer."""

from __future__ import annotations

import pytest
import torch

from binlat.generators import ARTransformer, DiffusionTransformer
from binlat.train.config import TrainConfig
from binlat.train.optimizers import MuonWithAdamW, is_hidden_matrix, make_optimizer


@pytest.mark.parametrize("network", [DiffusionTransformer, ARTransformer])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(network) -> None:
    model = network(
        network.config_class(
            num_bits=8, num_tokens=4, num_layers=2, num_heads=2, head_dim=8, text_dim=12, text_refiner_layers=1
        )
    )
    opt = make_optimizer(model, "muon", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].startswith(("blocks.", "text_refiner.blocks.")) and names[i].endswith(".weight") for i in muon)
    assert any(".attn." in names[i] for i in muon) and any(".mlp." in names[i] for i in muon)
    for n in ("x_embed.weight", "proj_out.weight", "blocks.0.pos_emb", "blocks.0.attn.qkv.bias"):
        assert not is_hidden_matrix(n, dict(model.named_parameters()).get(n, torch.zeros(2, 2)))
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})


def test_an_unknown_optimizer_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon, got 'sgd'"):
        TrainConfig(kind="diffusion", optimizer="sgd")
