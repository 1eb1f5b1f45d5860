"""Flow-GRPO (Liu et al. 2025) as released: PPO on the per-step log-probs of SDE rollouts.

For each trained step k (the first ``int(T * timestep_fraction)`` stochastic steps: 0..8 of
10 by default) the stored transition x_k -> x_{k+1} is re-scored under the current weights
with the rollout's CFG: ``ratio = exp(logp_theta - logp_old)``,
``L = mean(max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))) + beta_kl KL`` with
``KL = mean((mean_theta - mean_ref)^2) / (2 std_dev_t^2)`` against the frozen reference.
Losses are averaged over samples and trained steps. As released, samples whose advantage is
exactly 0 (every member of a group scored the same) are not trained: no passes, and not in
the mean. With ``updates_per_rollout`` k the rollout's samples are dealt at random into k
updates, as the release shuffles them; every update after the first is off-policy (its ratio
differs from 1 and the clip acts).
"""

from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field

from dgpo_bench.contracts import (Objective, OptimizerOptions, RolloutBatch, Sampler, SamplerOptions, StepOutput,
                                  StochasticSampler, TrainContext, Update)
from dgpo_bench.errors import IncompatibleComponentsError

from .advantages import local_advantages
from .training import micro_batches, reduce_metrics


def trained_steps(sampler: StochasticSampler, num_steps: int, timestep_fraction: float) -> list[int]:
    """Indices k of the transitions trained on: the stochastic steps below int(T * fraction)."""
    last = int(num_steps * timestep_fraction)
    steps = [k for k in sampler.stochastic_steps(num_steps) if k < last]
    if not steps:
        raise IncompatibleComponentsError(
            f"Objective 'flow-grpo' trains the stochastic steps below {last} of {num_steps}, and sampler "
            f"'{sampler.name}' as set has none; use noise_level > 0 and an sde_window (if any) that starts below "
            f"{last}, or raise flow-grpo.timestep_fraction."
        )
    return steps


class FlowGrpoOptions(OptimizerOptions):
    lr: float = 3e-4
    beta_kl: float = Field(0.04, ge=0)
    """Weight of the KL to the frozen reference (Flow-GRPO's 'beta')."""
    clip_range: float = Field(1e-4, ge=0)
    """PPO clip epsilon of the likelihood ratio."""
    timestep_fraction: float = Field(0.99, gt=0, le=1)
    """Train the steps k < int(T * timestep_fraction) that are stochastic (0..8 of 10)."""
    global_std: bool = True
    adv_clip: float = Field(5.0, gt=0)
    micro_batch_size: int | None = Field(None, ge=1)
    """Samples per forward/backward pass (None: all local samples at once). Matching the engine's
    rollout batch keeps the on-policy ratio bit-exactly 1; other sizes may differ by rounding."""
    drop_zero_advantage: bool = True
    """Train only samples whose advantage is not exactly 0 (released); False trains every sample."""


class FlowGrpo(Objective):
    """Flow-GRPO: PPO-clipped policy gradient on SDE rollouts with a KL to the reference."""

    name = "flow-grpo"
    Options = FlowGrpoOptions
    requires = frozenset({"log_probs"})
    default_sampler = "flow-sde"
    needs_trajectory = True
    shuffle_updates = True

    @classmethod
    def check_sampler(cls, options: FlowGrpoOptions, sampler: type[Sampler],
                      sampler_options: SamplerOptions) -> None:
        if not issubclass(sampler, StochasticSampler):
            raise IncompatibleComponentsError(
                f"Objective 'flow-grpo' re-scores stochastic steps, which sampler '{sampler.name}' "
                "cannot do; use --sampler flow-sde."
            )
        trained_steps(sampler(sampler_options), sampler_options.steps, options.timestep_fraction)

    def update(self, batch: RolloutBatch, ctx: TrainContext) -> Update:
        """Trained steps x micro-batches of the kept samples; each pass yields its share of the mean over
        the kept samples of every process and the trained steps. A process with fewer micro-batches
        than another pads with zero-weight passes."""
        o = self.options
        steps = trained_steps(ctx.sampler, batch.log_probs.shape[1], o.timestep_fraction)
        adv = local_advantages(batch, global_std=o.global_std, clip=o.adv_clip).to(batch.latents.device)
        kept = (adv != 0).nonzero().flatten().cpu() if o.drop_zero_advantage else torch.arange(len(batch))
        counts = ctx.gather(torch.tensor([len(kept)], device=ctx.accelerator.device)).cpu()
        chunks = [kept[c] for c in micro_batches(len(kept), o.micro_batch_size)]
        most = max(len(micro_batches(int(c), o.micro_batch_size)) for c in counts)
        chunks += [None] * (max(most, 1) - len(chunks))  # padding: a zero-weight pass on sample 0
        return Update(len(steps) * len(chunks), self._losses(batch, ctx, steps, chunks, adv, int(counts.sum())))

    def _losses(self, batch: RolloutBatch, ctx: TrainContext, steps: list[int], chunks: list[torch.Tensor | None],
                adv: torch.Tensor, kept: int) -> Iterator[torch.Tensor]:
        o, bb, sampler = self.options, ctx.backbone, ctx.sampler
        device = batch.latents.device
        traj, old = batch.trajectory, batch.log_probs.to(device)
        g = batch.guidance_scale
        units = max(kept, 1) * len(steps)  # kept samples x trained steps, on every process
        pad = torch.zeros(1, dtype=torch.long)
        ratios, clipped, approx_kl, kls, policy = [], [], [], [], torch.zeros(())
        for k in steps:
            for c in chunks:
                weight, c = (1.0, c) if c is not None else (0.0, pad)
                cond = batch.cond.select(c)
                x, x_next = traj[c, k].to(device), traj[c, k + 1].to(device)
                logp, mean, std_dev_t = sampler.step_log_prob(bb, cond, x, x_next, batch.sigmas, k, g)
                ratio = torch.exp(logp - old[c, k])
                a = adv[c]
                pl = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - o.clip_range, 1 + o.clip_range))
                loss = pl.sum()
                if o.beta_kl > 0:
                    with torch.no_grad(), bb.reference():
                        _, mean_ref, _ = sampler.step_log_prob(bb, cond, x, x_next, batch.sigmas, k, g)
                    kl = (mean - mean_ref).square().flatten(1).mean(1) / (2 * std_dev_t**2)
                    loss = loss + o.beta_kl * kl.sum()
                yield loss * (weight / units)
                if not weight:
                    continue
                if o.beta_kl > 0:
                    kls.append(kl.detach())
                policy = policy + pl.detach().sum().cpu() / units * ctx.num_processes
                ratios.append(ratio.detach())
                clipped.append(((ratio.detach() - 1).abs() > o.clip_range).float())
                approx_kl.append(0.5 * (logp.detach() - old[c, k]).square())

        r = torch.cat(ratios) if ratios else torch.ones(1)  # a process without kept samples reports ratio 1
        metrics = {"policy_loss": float(policy), "clip_frac": float(torch.cat(clipped).mean()) if clipped else 0.0,
                   "approx_kl": float(torch.cat(approx_kl).mean()) if approx_kl else 0.0,
                   "ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
                   "kl": float(torch.cat(kls).mean()) if kls else 0.0, "adv_abs_mean": float(adv.abs().mean())}
        metrics = reduce_metrics(ctx, metrics, mins=("ratio_min",), maxs=("ratio_max",))
        metrics.update(trained_steps=float(len(steps)), kept_frac=kept / (len(batch) * ctx.num_processes))
        return StepOutput(metrics=metrics, advantages=adv.detach().cpu())
