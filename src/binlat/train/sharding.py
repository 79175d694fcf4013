"""Checkpoints of sharded models: gather full state dicts from FSDP2 (DTensor) parameters, and load them back.

Under FSDP2 (PyTorch's `fully_shard`, which accelerate's FSDP plugin uses with fsdp_version 2) every parameter
is a DTensor holding one shard: `model.state_dict()` and `optimizer.state_dict()` give shards, which must not be
written as if they were the model. These helpers gather full tensors (a collective: every rank calls them, in the
same order) and cut a full state back into this rank's shards. For a model that is not sharded they are the plain
calls, so a checkpoint is the same files either way: model weights by name, the optimizer state keyed by parameter
index (as `torch.optim.Optimizer.state_dict` writes it); a sharded run resumes an unsharded run's checkpoint.

Before any of that, a launch that asks for sharding on a machine without an accelerator, or whose processes
accelerate does not see as one world, is stopped with one line (check_sharding_has_an_accelerator, check_one_run).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

SHARDED_TYPES = ("FSDP", "DEEPSPEED")
CPU_LAUNCH_CONFIG = "configs/accelerate/cpu-ddp-2proc.yaml"


def check_sharding_has_an_accelerator(distributed_type: Any = None, device: torch.device | None = None) -> None:
    """An FSDP or DeepSpeed launch on a machine without an accelerator stops here, before `prepare` (where
    accelerate's own CPU errors differ by version and CPU: "sync_module_states=True is not supported on cpu", "no
    available devices", ...). Decided by the condition, not by a message: the launch asks for sharding (the
    launcher's ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED, or the Accelerator's distributed type) and there is
    no accelerator (torch sees none, or the Accelerator's device is a CPU)."""
    asked = {
        kind
        for kind in SHARDED_TYPES
        if os.environ.get(f"ACCELERATE_USE_{kind}", "").strip().lower() in ("1", "true", "yes")
    }
    if distributed_type is not None:
        asked.add(str(getattr(distributed_type, "value", distributed_type)).upper())
    sharded = sorted(asked & set(SHARDED_TYPES))
    no_accelerator = not torch.accelerator.is_available() if device is None else device.type == "cpu"
    if sharded and no_accelerator:
        name = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}[sharded[0]]
        raise ValueError(
            f"this launch asks for {name} sharding, which needs GPUs, and this machine has none; on CPUs "
            f"launch with {CPU_LAUNCH_CONFIG} (DDP over processes) or run without accelerate launch"
        )


def check_one_run(world: int, distributed_type: Any) -> None:
    """The processes the launcher started (its WORLD_SIZE) must be the world accelerate sees, or they do not form
    one run."""
    launched = os.environ.get("WORLD_SIZE")
    if launched and launched.isdigit() and int(launched) != world:
        # e.g. an FSDP or DeepSpeed launch config that accelerate turned into single-process runs on a CPU:
        # every process would train its own copy into the same folder.
        raise ValueError(
            f"the launcher started {launched} processes but accelerate sees a world of {world} "
            f"({distributed_type}); these processes do not form one run. Check the "
            f"launch config against this machine (on CPUs: configs/accelerate/cpu-ddp-2proc.yaml)"
        )


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full(value: Any) -> Any:
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, every sharded tensor gathered (a collective: every rank calls it, in the same order)."""
    return {k: _full(v) for k, v in model.state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() (keyed by parameter index) with every sharded moment gathered into a full tensor."""
    state = optimizer.state_dict()
    if not is_sharded(model):
        return state
    return {
        "state": {i: {k: _full(v) for k, v in s.items()} for i, s in sorted(state["state"].items())},
        "param_groups": state["param_groups"],
    }


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full, index-keyed optimizer state into the optimizer of a sharded or plain model. Every rank holds
    the whole state (it read the same file), so each cuts its own shards: no communication."""
    if is_sharded(model):
        params = [p for p in model.parameters() if p.requires_grad]  # the optimizer's order (one group)

        def shard(value: Any, param: torch.Tensor) -> Any:
            if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
                return distribute_tensor(
                    value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                )
            return value

        state = {
            "state": {i: {k: shard(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"],
        }
    optimizer.load_state_dict(state)


def like(shadow: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`shadow` (a full tensor) laid out as `value`: sharded the same way when value is a DTensor."""
    if isinstance(value, DTensor) and not isinstance(shadow, DTensor):
        # every rank holds the same full average: each keeps its own shard, nothing is sent
        return distribute_tensor(shadow.to(value.device), value.device_mesh, value.placements, src_data_rank=None)
    return shadow


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every DTensor of `state` gathered into a full tensor (a collective); other tensors as they are."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
