"""The training optimiser: AdamW, or Muon for the blocks' weight matrices beside AdamW for everything else.

Muon (torch.optim.Muon) orthogonalises each matrix's momentum (Newton-Schulz), so every direction of a weight
matrix moves at the same rate; Moonlight (2025) reports about twice AdamW's compute efficiency. It is defined for
matrices only, and for the hidden ones: embeddings, output heads, biases, norms and position tables stay with
AdamW, as in Moonlight and Keller Jordan's recipe. With `adjust_lr_fn="match_rms_adamw"` one learning rate
serves both.

The two live in one `torch.optim.Optimizer`, so the trainer, accelerate and checkpoints see a single optimiser:
one list of parameter groups (the trainer sets every group's lr), one state keyed by parameter index."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A weight matrix inside a stack of blocks (`...blocks.N...`): Muon's share of the parameters."""
    return param.ndim == 2 and name.endswith(".weight") and ".blocks." in f".{name}"


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `matrices`, torch.optim.AdamW over `others`, stepped together.

    The two inner optimisers share this optimiser's parameter-group dicts and its state (their parameters are
    disjoint), so state_dict/load_state_dict are the base class's, index-keyed over all groups in order."""

    def __init__(
        self,
        matrices: Sequence[torch.Tensor],
        others: Sequence[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
    ):
        if not matrices:
            raise ValueError("optimizer muon found no weight matrix inside a stack of blocks to apply to")
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        groups = list(self.muon.param_groups)
        self.adamw = None
        if others:
            self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas, weight_decay=weight_decay)
            groups += self.adamw.param_groups
        super().__init__(groups, {"lr": lr})
        self._share()

    def _share(self) -> None:
        """Point the inner optimisers at this one's groups and state (after __init__ and after every load)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.muon.state = self.param_groups[:n], self.state
        if self.adamw is not None:
            self.adamw.param_groups, self.adamw.state = self.param_groups[n:], self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss


def make_optimizer(
    model: nn.Module, name: str, *, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer:
    """The trainable parameters of `model` under optimiser `name` (one of OPTIMIZERS)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "muon":
        matrices = [p for n, p in named if is_hidden_matrix(n, p)]
        others = [p for n, p in named if not is_hidden_matrix(n, p)]
        return MuonWithAdamW(matrices, others, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
