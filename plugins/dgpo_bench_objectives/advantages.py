"""Group advantages shared by DGPO and Flow-GRPO.

``A_i = (r_i - mean_group(r)) / (std + 1e-4)`` with the population std of the group or of
every reward of the step (``global_std``), clamped to [-clip, clip].
"""

from __future__ import annotations

import torch

from dgpo_bench.contracts import RolloutBatch, TrainContext


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool,
                     clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """Advantages of every sample from all rewards of the step and their group ids."""
    r = rewards.double()
    n_groups = int(group_ids.max()) + 1
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, group_ids, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, group_ids, r) / count.clamp_min(1)
    centred = r - mean[group_ids]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        var = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, group_ids, centred**2) / count.clamp_min(1)
        std = var.sqrt()[group_ids]
    return (centred / (std + eps)).clamp(-clip, clip).to(rewards.dtype)


def local_advantages(batch: RolloutBatch, ctx: TrainContext, *, global_std: bool, clip: float) -> torch.Tensor:
    """This process's slice of the advantages computed over every process's rewards.

    Assumes every process holds the same number of samples (as the engine guarantees).
    """
    device = batch.rewards.device
    rewards = ctx.gather(batch.rewards.to(ctx.accelerator.device)).cpu()
    group_ids = ctx.gather(batch.group_ids.to(ctx.accelerator.device)).cpu()
    adv = group_advantages(rewards, group_ids.long(), global_std=global_std, clip=clip)
    start = ctx.accelerator.process_index * len(batch)
    return adv[start:start + len(batch)].to(device)
