"""The engine's side of an objective step: seeded RNG, collectives, backward, optimizer."""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from .contracts import Backbone, OptimizerOptions, Sampler, TrainContext
from .errors import TrainingDivergedError


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on ``keys`` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EngineContext(TrainContext):
    """Concrete ``TrainContext``; works with one process or many under accelerate.

    Gradients are averaged across processes in ``optimizer_step`` (DDP semantics
    without wrapping the model, so reference/EMA passes need no special casing).
    """

    def __init__(self, backbone: Backbone, sampler: Sampler, accelerator, options: OptimizerOptions,
                 seed: int, group_size: int, num_groups: int):
        self.backbone, self.sampler, self.accelerator = backbone, sampler, accelerator
        self.seed, self.group_size, self.num_groups = seed, group_size, num_groups
        self.step = 0
        self.params = [p for p in backbone.trainable_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=options.lr, betas=tuple(options.betas),
                                           weight_decay=options.weight_decay)
        self.grad_clip = options.grad_clip

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def rng(self, *keys: int | str) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(derive_seed(self.seed, "objective", self.step, *keys))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return self.accelerator.gather(tensor.contiguous())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    def backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDivergedError(
                f"The loss became {loss.detach().float().item()} at step {self.step}; lower the learning "
                "rate or the objective's beta, or check the reward for NaN scores."
            )
        self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        """Average gradients across processes, clip, step and zero; returns the grad norm."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.num_processes > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = self.accelerator.reduce(flat, reduction="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(
                f"The gradient norm became {norm.item()} at step {self.step}; lower the learning rate."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backbone.meter.optimizer_steps += 1
        return float(norm)

    def group_sum(self, values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-group sums of a per-sample tensor over all processes -> (num_groups,)."""
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        out.index_add_(0, group_ids.to(values.device), values)
        return self.all_reduce_sum(out)


def sample_seeds(seed: int, step: int, indices: Sequence[int], purpose: str = "rollout") -> list[int]:
    """Per-sample noise seeds for global sample ``indices`` of optimizer step ``step``."""
    return [derive_seed(seed, purpose, step, int(i)) for i in indices]
