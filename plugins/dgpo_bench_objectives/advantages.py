"""Group advantages shared by DGPO and Flow-GRPO.

``A_i = (r_i - mean_group(r)) / (std + 1e-4)`` with the population std of the group or of
every reward of the step (``global_std``), clamped to [-clip, clip].
"""

from __future__ import annotations

import torch

from dgpo_bench.contracts import RolloutBatch


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


def local_advantages(batch: RolloutBatch, *, global_std: bool, clip: float) -> torch.Tensor:
    """This process's samples' advantages, computed over every reward of the rollout (all processes
    and all of its updates, as the releases compute them over a sampling epoch)."""
    adv = group_advantages(batch.rollout_rewards, batch.rollout_group_ids.long(), global_std=global_std, clip=clip)
    return adv[batch.sample_ids.long()].to(batch.rewards.device)
