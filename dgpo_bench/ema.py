"""Exponential moving averages of trainable weights (DGPO's fast EMA, the evaluation EMA)."""

from __future__ import annotations

from typing import Sequence

import torch

from .sharding import full_tensor, like


class WeightEma:
    """``ema <- decay * ema + (1 - decay) * weights``, one fp32 tensor per trainable parameter (sharded
    like the parameter under FSDP2: each process keeps the EMA of its own shard)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.tensors = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], decay: float) -> None:
        for e, p in zip(self.tensors, params, strict=True):
            e.lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self) -> list[torch.Tensor]:
        """Whole tensors on the CPU (gathered from the shards under FSDP2: every process calls it)."""
        return [full_tensor(t).cpu() for t in self.tensors]

    def load_state_dict(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.tensors):
            raise ValueError(f"EMA state has {len(tensors)} tensors, expected {len(self.tensors)}")
        self.tensors = [like(t, e).clone() for t, e in zip(tensors, self.tensors)]
