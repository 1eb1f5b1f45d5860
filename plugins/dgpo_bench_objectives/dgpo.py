"""DGPO (Luo, Hu, Tang 2025) in its released form: group-level direct preference on final samples.

Per step: M timesteps drawn from the first ``trunc_steps + 1`` points of the rollout grid
(shared by every sample); per timestep one noise per group, ``x_t = (1 - s) x0 + s eps``;
per-sample velocity losses of the policy (conditional, no CFG), the frozen reference and
the fast EMA; ``s_g = (beta_dpo / G) sum_g A_i stopgrad(L_i - L_i_ref)`` summed over every
process; loss ``mean_i(sigmoid(s_g) A_i L_i) + beta_kl mean_i(mean((v - v_ref)^2))`` with the
trust region detaching ``L_i`` where ``rho_i = exp(L_i_old - L_i)`` leaves [1 - clip, 1 + clip]
on the side the advantage pushes. The fast EMA (decay ``min(0.3, 0.001 step)``) drives
the rollouts of every step whose index exceeds ``ema_rollout_after``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from dgpo_bench.contracts import Objective, OptimizerOptions, RolloutBatch, StepOutput, TrainContext, Update
from dgpo_bench.ema import WeightEma

from .advantages import local_advantages
from .training import micro_batches, reduce_metrics, velocity_mse


class DgpoOptions(OptimizerOptions):
    lr: float = 3e-4
    beta_dpo: float = Field(100.0, gt=0)
    """Scale of the group preference s_g; set it for the backbone's loss scale."""
    beta_kl: float = Field(0.02, ge=0)
    """Weight of the velocity KL to the frozen reference."""
    clip_range: float = Field(1e-2, ge=0)
    trust_region: bool = True
    """Detach L_i where the ratio to the fast EMA left the clip range (released 'clip_dsm')."""
    trust_region_kl: bool = False
    """Also detach those samples' KL term (released 'clip_kl')."""
    num_timesteps: int = Field(4, ge=1)
    """M: timesteps trained per step, shared by every sample."""
    trunc_steps: int = Field(6, ge=0)
    """Timesteps come from the first trunc_steps + 1 points of the rollout grid (fewer on a shorter grid)."""
    timestep_sampling: Literal["grid", "uniform"] = "grid"
    """'grid': M distinct grid points (released); 'uniform': sigma ~ U[grid[trunc_steps], grid[0]] (paper)."""
    global_std: bool = True
    """Advantage std over the whole step (True) or per group (False)."""
    adv_clip: float = Field(5.0, gt=0)
    shared_noise: bool = True
    """One noise per group and timestep (released); False draws one per sample."""
    rollout_noise: bool = False
    """Train each sample at x_t = (1 - s) x0 + s x1 with x1 its own rollout's initial noise, at every
    timestep (not released: an advantage-weighted reflow of the sampler's own couplings); replaces
    shared_noise's fresh draws."""
    reference: Literal["base", "fast-ema"] = "base"
    """Reference of the preference term: the frozen base model, or the fast EMA (dynamic reference)."""
    ema_rollout_after: int | None = Field(200, ge=0)
    """Roll out with the fast EMA once more than this many optimizer steps are done (None: never).
    As released (``global_step > switch_ema_ref``): with 200, steps 0..200 (0-based, 201 rollouts) use
    the current weights and step 201 is the first with the EMA."""
    fast_ema_max_decay: float = Field(0.3, ge=0, lt=1)
    fast_ema_decay_rate: float = Field(0.001, ge=0)
    """Fast-EMA decay at step k is min(fast_ema_max_decay, fast_ema_decay_rate * k)."""
    loss_form: Literal["released", "paper"] = "released"
    """'released': mean_i(w_g A_i L_i); 'paper': mean_g(-log sigmoid(-s_g)), whose preference gradient
    is beta_dpo times the released one's (same direction, different balance with the KL)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Samples per forward/backward pass (None: all local samples at once). Where every pass holds whole
    groups (a multiple of the group size, groups not split across processes), as released, s_g comes
    from each pass's own losses; otherwise one more no-grad policy pass per timestep computes it."""

    @model_validator(mode="after")
    def _pool(self) -> "DgpoOptions":
        if self.timestep_sampling == "grid" and self.num_timesteps > self.trunc_steps + 1:
            raise ValueError(f"num_timesteps={self.num_timesteps} distinct grid points need "
                             f"trunc_steps >= {self.num_timesteps - 1}")
        if self.rollout_noise and not self.shared_noise:
            raise ValueError("shared_noise=false has no effect with rollout_noise=true (each sample then "
                             "trains on its own rollout noise); set only one of them")
        return self


class Dgpo(Objective):
    """DGPO as released: group-weighted velocity losses with a trust region and fast-EMA rollouts."""

    name = "dgpo"
    Options = DgpoOptions
    default_sampler = "dpm-solver"
    needs_trajectory = False

    def __init__(self, options=None):
        super().__init__(options)
        self.fast_ema: WeightEma | None = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, ctx: TrainContext) -> None:
        self.fast_ema = WeightEma(ctx.backbone.trainable_parameters())

    def rollout_weights(self, ctx: TrainContext) -> contextlib.AbstractContextManager:
        if self._rolls_out_ema(ctx):
            return ctx.backbone.swapped_weights(self.fast_ema.tensors, role="ema")
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {"fast_ema": self.fast_ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.fast_ema.load_state_dict(state["fast_ema"])

    # ------------------------------------------------------------------ randomness
    def draw_timesteps(self, ctx: TrainContext, sigmas: torch.Tensor) -> torch.Tensor:
        """The M sigmas trained this step (identical on every process)."""
        o = self.options
        pool = sigmas[: min(o.trunc_steps + 1, len(sigmas) - 1)].float()  # never the final sigma 0
        gen = ctx.rng("dgpo-timesteps")
        if o.timestep_sampling == "grid":
            return pool[torch.randperm(len(pool), generator=gen)[: o.num_timesteps]]
        u = torch.rand(o.num_timesteps, generator=gen)
        return pool[-1] + u * (pool[0] - pool[-1])

    def timestep_noise(self, ctx: TrainContext, group_ids: torch.Tensor, j: int,
                       shape: tuple[int, ...]) -> torch.Tensor:
        """Noise of timestep index ``j`` for the local samples: one draw per group (or per sample)."""
        gen = ctx.rng("dgpo-noise", j)
        if self.options.shared_noise:
            return torch.randn(ctx.num_groups, *shape, generator=gen)[group_ids.cpu()]
        n = len(group_ids)
        start = ctx.accelerator.process_index * n
        return torch.randn(ctx.accelerator.num_processes * n, *shape, generator=gen)[start:start + n]

    # ------------------------------------------------------------------ update
    def update(self, batch: RolloutBatch, ctx: TrainContext) -> Update:
        """M timesteps x micro-batches passes; each yields its share of the mean over samples and timesteps."""
        train_sigmas = self.draw_timesteps(ctx, batch.sigmas)
        chunks = micro_batches(len(batch), self.options.micro_batch_size)
        return Update(len(train_sigmas) * len(chunks), self._losses(batch, ctx, train_sigmas, chunks))

    def after_update(self, ctx: TrainContext) -> None:
        o = self.options
        self.fast_ema.update(ctx.backbone.trainable_parameters(),
                             min(o.fast_ema_max_decay, o.fast_ema_decay_rate * ctx.step))

    def _losses(self, batch: RolloutBatch, ctx: TrainContext, train_sigmas: torch.Tensor,
                chunks: list[slice]) -> Iterator[torch.Tensor]:
        o, bb = self.options, ctx.backbone
        device = batch.latents.device
        adv = local_advantages(batch, global_std=o.global_std, clip=o.adv_clip).to(device)
        gids = batch.group_ids.to(device).long()
        x0 = batch.latents.float()
        n, G = len(batch), ctx.group_size
        N = n * ctx.num_processes  # samples of this update on every process
        need_old = o.trust_region or o.reference == "fast-ema"
        M = len(train_sigmas)
        members = ctx.group_sum(torch.ones(n, device=device), gids)  # per group, on every process
        present = members > 0  # the groups this update holds
        whole = len(chunks) > 1 and self._whole_groups(ctx, gids, chunks, members)

        def velocities(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            if len(chunks) == 1:  # one pass: no concatenated copy of its output
                return bb.velocity(x, s, batch.cond)
            return torch.cat([bb.velocity(x[c], s, batch.cond.select(c)) for c in chunks])

        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("weight", "s_g", "clip", "rho", "kl", "gap", "pref")}
        for j, s in enumerate(train_sigmas):
            s = s.to(device)
            eps = (batch.noise.float() if o.rollout_noise
                   else self.timestep_noise(ctx, gids, j, x0.shape[1:])).to(device)
            x_t = (1 - s) * x0 + s * eps
            target = eps - x0
            with torch.no_grad():
                with bb.reference():
                    v_ref = velocities(x_t, s)
                L_base = velocity_mse(v_ref, target)
                L_old = None
                if need_old:
                    with bb.swapped_weights(self.fast_ema.tensors, role="ema"):
                        L_old = velocity_mse(velocities(x_t, s), target)
                L_ref = L_old if o.reference == "fast-ema" else L_base
                s_g = None
                if len(chunks) > 1 and not whole:  # s_g needs every member's loss before the first backward
                    s_g = self._group_sums(ctx, adv, velocity_mse(velocities(x_t, s), target), L_ref, gids)

            pref_value = torch.zeros(())
            s_whole = torch.zeros(ctx.num_groups, device=device)
            for c in chunks:
                v = bb.velocity(x_t[c], s, batch.cond.select(c))
                L = velocity_mse(v, target[c])
                a = adv[c]
                if whole or s_g is None:  # whole: this pass holds its groups whole, their sums are complete
                    s_g = self._group_sums(ctx, a, L.detach(), L_ref[c], gids[c])
                    s_whole = s_whole + s_g
                w = torch.sigmoid(s_g)
                clipped = torch.zeros_like(L, dtype=torch.bool)
                if o.trust_region:
                    rho = torch.exp(L_old[c] - L.detach())
                    clipped = torch.where(a > 0, rho > 1 + o.clip_range, rho < 1 - o.clip_range)
                    stats["rho"].append(rho)
                L_used = torch.where(clipped, L.detach(), L)
                kl = (v.float() - v_ref[c]).square().flatten(1).mean(1)
                if o.trust_region_kl:
                    kl = torch.where(clipped, kl.detach(), kl)
                if o.loss_form == "released":
                    pref = (w[gids[c]] * a * L_used).sum() / N
                    pref_value = pref_value + pref.detach().cpu() * ctx.num_processes
                else:
                    s_local = torch.zeros_like(s_g).index_add(0, gids[c], a * L_used) * (o.beta_dpo / G)
                    s_val = s_g + s_local - s_local.detach()  # value: every process; gradient: this chunk
                    pref = -F.logsigmoid(-s_val)[present].sum() / int(present.sum())
                yield (pref + o.beta_kl * kl.sum() / N) / M
                stats["clip"].append(clipped.float())
                stats["kl"].append(kl.detach())
                stats["gap"].append(L.detach() - L_base[c])
            if whole:
                s_g = s_whole
                w = torch.sigmoid(s_g)
            if o.loss_form == "paper":
                pref_value = -F.logsigmoid(-s_g[present]).mean().cpu()
            stats["pref"].append(pref_value)
            stats["weight"].append(w[present])
            stats["s_g"].append(s_g[present])

        cat = {k: torch.cat([t.reshape(-1) for t in v]) for k, v in stats.items() if v}
        metrics = {
            "pref_loss": float(cat["pref"].mean()),
            "kl": float(cat["kl"].mean()),
            "clip_frac": float(cat["clip"].mean()),
            "loss_gap": float(cat["gap"].mean()),
            "adv_abs_mean": float(adv.abs().mean()),
            "sigma_mean": float(train_sigmas.mean()),
        }
        if "rho" in cat:
            metrics.update(ratio_mean=float(cat["rho"].mean()), ratio_min=float(cat["rho"].min()),
                           ratio_max=float(cat["rho"].max()))
        metrics = reduce_metrics(ctx, metrics, mins=("ratio_min",), maxs=("ratio_max",))
        # group weights and sums are already identical on every process
        metrics.update(group_weight_mean=float(cat["weight"].mean()), group_weight_min=float(cat["weight"].min()),
                       group_weight_max=float(cat["weight"].max()), s_g_abs_mean=float(cat["s_g"].abs().mean()),
                       rollout_ema=float(self._rolls_out_ema(ctx)))
        return StepOutput(metrics=metrics, advantages=adv.detach().cpu())

    @staticmethod
    def _whole_groups(ctx: TrainContext, gids: torch.Tensor, chunks: list[slice], members: torch.Tensor) -> bool:
        """Whether every micro-batch, on every process, holds all ``members`` of each of its groups (as
        the release's micro-batches do): s_g then comes from the pass's own losses, with no extra
        policy pass."""
        mine = all(bool((torch.bincount(gids[c], minlength=ctx.num_groups)[gids[c]] == members[gids[c]]).all())
                   for c in chunks)
        return int(ctx.all_reduce_sum(torch.tensor([float(mine)], device=gids.device)).item()) == ctx.num_processes

    def _group_sums(self, ctx: TrainContext, adv: torch.Tensor, L: torch.Tensor, L_ref: torch.Tensor,
                    gids: torch.Tensor) -> torch.Tensor:
        """s_g = (beta_dpo / G) * sum over the group's members on every process of A_i (L_i - L_i_ref)."""
        return ctx.group_sum((adv * (L - L_ref)).detach(), gids) * (self.options.beta_dpo / ctx.group_size)

    def _rolls_out_ema(self, ctx: TrainContext) -> bool:
        """Whether step ``ctx.step`` (0-based, = optimizer steps done) rolls out with the fast EMA."""
        after = self.options.ema_rollout_after
        return after is not None and ctx.step > after
