"""Tensors under FSDP2: parameters and the state that follows them may be sharded DTensors.

Every helper is a no-op on plain tensors, so the same code serves one process, DDP and FSDP2.
``full_tensor`` is a collective: every process calls it, in the same order.
"""

from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter sharded by FSDP2 or a shard of state that follows one)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reshard(module: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back in its sharded state, so that its registered parameters
    are the sharded DTensors (a no-grad forward leaves the root unit's gathered copies registered)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (gathered from the shards of a DTensor)."""
    return t.full_tensor() if is_sharded(t) else t


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` in ``target``'s device, dtype and (for a DTensor) sharding."""
    full = full.to(target.device, target.dtype)
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, target.device_mesh, target.placements)
    return full
