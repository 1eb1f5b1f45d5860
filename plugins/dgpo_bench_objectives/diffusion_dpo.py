"""Online Diffusion-DPO (Wallace et al. 2023) in flow-matching (velocity) form.

Each group gives one pair: its best sample (winner) and its worst (loser); a group whose
rewards are all equal gives none. Winner and loser share one timestep and one noise.
``inside = -beta/2 ((L_w - L_l) - (L_w_ref - L_l_ref))``, ``loss = -log sigmoid(inside)``
averaged over pairs; implicit accuracy = ``mean(inside > 0)``.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from dgpo_bench.contracts import (Conditioning, Objective, OptimizerOptions, RolloutBatch, StepOutput, TrainContext,
                                  Update)

from .training import micro_batches, velocity_mse


class DiffusionDpoOptions(OptimizerOptions):
    lr: float = 3e-4
    beta: float = Field(100.0, gt=0)
    """beta in the 1/2 form; values do not transfer between epsilon and velocity targets."""
    timestep_sampling: Literal["uniform", "logit-normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    """sigma = sigmoid(N(logit_mean, logit_std^2)) under 'logit-normal'."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Pairs per forward/backward pass (None: all of this process's pairs at once)."""


def select_pairs(rewards: torch.Tensor, group_ids: torch.Tensor, num_groups: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winner index, loser index, has a preference) per group, over all samples of the step.

    The winner is the first sample with the group's highest reward, the loser the first
    with its lowest.
    """
    idx = torch.arange(len(rewards))
    win, lose, valid = [], [], []
    members = [idx[group_ids == g] for g in range(num_groups)]
    for m in members:
        r = rewards[m]
        win.append(m[int(torch.argmax(r))])
        lose.append(m[int(torch.argmin(r))])
        valid.append(bool(r.max() > r.min()))
    return torch.stack(win), torch.stack(lose), torch.tensor(valid)


def dpo_loss(L_w: torch.Tensor, L_l: torch.Tensor, L_w_ref: torch.Tensor, L_l_ref: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, inside term) of Diffusion-DPO on per-sample velocity losses."""
    inside = -beta / 2 * ((L_w - L_l) - (L_w_ref - L_l_ref))
    return -F.logsigmoid(inside), inside


class DiffusionDpo(Objective):
    """Online Diffusion-DPO on best-vs-worst pairs of each group, velocity form."""

    name = "diffusion-dpo"
    Options = DiffusionDpoOptions
    default_sampler = "dpm-solver"
    needs_trajectory = False

    def pair_sigmas(self, ctx: TrainContext) -> torch.Tensor:
        """One sigma per group (identical on every process)."""
        o = self.options
        gen = ctx.rng("dpo-sigmas")
        if o.timestep_sampling == "uniform":
            return torch.rand(ctx.num_groups, generator=gen)
        return torch.sigmoid(o.logit_mean + o.logit_std * torch.randn(ctx.num_groups, generator=gen))

    def pair_noise(self, ctx: TrainContext, shape: tuple[int, ...]) -> torch.Tensor:
        """One noise per group, shared by its winner and loser."""
        return torch.randn(ctx.num_groups, *shape, generator=ctx.rng("dpo-noise"))

    def update(self, batch: RolloutBatch, ctx: TrainContext) -> Update:
        """Micro-batches of this process's pairs; every process gets as many passes, padded with
        zero-weight pairs where the groups do not split evenly."""
        gids = ctx.gather(batch.group_ids.to(ctx.accelerator.device)).cpu().long()
        groups = gids.unique()
        per_process = -(-len(groups) // ctx.num_processes)
        chunks = micro_batches(per_process, self.options.micro_batch_size)
        return Update(len(chunks), self._losses(batch, ctx, gids, groups, per_process, chunks))

    def _losses(self, batch: RolloutBatch, ctx: TrainContext, gids: torch.Tensor, groups: torch.Tensor,
                per_process: int, chunks: list[slice]) -> Iterator[torch.Tensor]:
        o, bb = self.options, ctx.backbone
        acc = ctx.accelerator
        device = batch.latents.device
        rewards = ctx.gather(batch.rewards.to(acc.device)).cpu()
        win, lose, valid = select_pairs(rewards, torch.searchsorted(groups, gids), len(groups))
        # Winner and loser may sit on different processes: every process sees every sample.
        latents = ctx.gather(batch.latents.float().to(acc.device)).to(device)
        cond = Conditioning({k: ctx.gather(v.to(acc.device)).to(device) for k, v in batch.cond.tensors.items()})
        sigmas = self.pair_sigmas(ctx)[groups]
        noise = self.pair_noise(ctx, tuple(latents.shape[1:]))[groups]
        mine = torch.arange(acc.process_index, len(groups), ctx.num_processes)
        real = torch.cat([torch.ones(len(mine)), torch.zeros(per_process - len(mine))])
        mine = torch.cat([mine, torch.zeros(per_process - len(mine), dtype=torch.long)])  # padding: weight 0
        n_valid = int(valid.sum())

        sums = torch.zeros(4, dtype=torch.float64)  # loss, accuracy, inside, reward margin over valid pairs
        for c in chunks:
            pairs = mine[c]
            w_idx, l_idx = win[pairs], lose[pairs]
            ok = (valid[pairs].float() * real[c]).to(device)
            rows = torch.cat([w_idx, l_idx]).to(device)
            s = sigmas[pairs].to(device).repeat(2)
            eps = torch.cat([noise[pairs], noise[pairs]]).to(device)
            x0 = latents[rows]
            s_b = s.view(-1, *[1] * (x0.dim() - 1))
            x_t = (1 - s_b) * x0 + s_b * eps
            target = eps - x0
            pair_cond = cond.select(rows)
            L_w, L_l = velocity_mse(bb.velocity(x_t, s, pair_cond), target).chunk(2)
            with torch.no_grad(), bb.reference():
                L_w_ref, L_l_ref = velocity_mse(bb.velocity(x_t, s, pair_cond), target).chunk(2)
            loss, inside = dpo_loss(L_w, L_l, L_w_ref, L_l_ref, o.beta)
            yield (loss * ok).sum() / max(n_valid, 1)
            margin = (rewards[w_idx] - rewards[l_idx]).to(device)
            sums += torch.stack([(loss.detach() * ok).sum(), ((inside.detach() > 0).float() * ok).sum(),
                                 (inside.detach() * ok).sum(), (margin * ok).sum()]).double().cpu()

        totals = ctx.all_reduce_sum(sums.to(acc.device)).cpu() / max(n_valid, 1)
        metrics = {"loss": float(totals[0]), "implicit_acc": float(totals[1]), "inside_mean": float(totals[2]),
                   "reward_margin": float(totals[3]), "pairs": float(n_valid)}
        return StepOutput(metrics=metrics)
