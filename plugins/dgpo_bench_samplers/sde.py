"""Flow-GRPO's SDE sampler: the flow ODE turned into an SDE with the same marginals.

Per step k, with s = sigma_k, dt = sigma_{k+1} - s < 0, CFG velocity v and noise level a:
``std_dev_t = a * sqrt(s / (1 - s))`` (at s = 1 the next sigma stands in the denominator),
``mean = x (1 + std_dev_t^2 dt / (2 s)) + v (1 + std_dev_t^2 (1 - s) / (2 s)) dt`` and
``x_next = mean + std_dev_t sqrt(-dt) noise``. The log-prob is the Gaussian log-density of
x_next averaged over all dimensions, in fp32.
"""

from __future__ import annotations

import math

import torch
from pydantic import model_validator

from dgpo_bench.contracts import (Backbone, Conditioning, SampleNoise, SampleOutput, SamplerOptions,
                                  StochasticSampler)

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_std(sigmas: torch.Tensor, k: int, noise_level: float) -> torch.Tensor:
    """std_dev_t of step k (a 0-dim fp32 tensor); 0 when ``noise_level`` is 0."""
    s = sigmas[k].float()
    s_den = sigmas[1].float() if s >= 1 else s
    return noise_level * torch.sqrt(s / (1 - s_den))


def sde_mean(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor,
             std_dev_t: torch.Tensor) -> torch.Tensor:
    """Mean of x_next; with std_dev_t = 0 this is the Euler step x + v dt."""
    dt = s_next - s
    return x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over every dimension but the first -> (B,)."""
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


class FlowSdeOptions(SamplerOptions):
    noise_level: float = 0.7
    """a in std_dev_t = a * sqrt(s / (1 - s)); 0 gives plain Euler."""
    sde_window: tuple[int, int] | None = None
    """Steps [start, stop) that use the SDE, the ODE elsewhere (Flow-GRPO-Fast / MixGRPO); None: all."""

    @model_validator(mode="after")
    def _window(self) -> "FlowSdeOptions":
        if self.sde_window is not None:
            start, stop = self.sde_window
            if not 0 <= start < stop <= self.steps:
                raise ValueError(f"sde_window must satisfy 0 <= start < stop <= steps={self.steps}")
        if self.noise_level < 0:
            raise ValueError("noise_level must be >= 0")
        return self


class FlowSde(StochasticSampler):
    """Flow-GRPO's SDE on the shifted Euler grid, with per-step log-probs.

    Capability methods (see ``StochasticSampler``): ``stochastic_steps(T)`` lists the steps
    that draw noise (all, or those in ``sde_window``); ``step_log_prob(backbone, cond, x,
    x_next, sigmas, k, guidance_scale)`` recomputes (log_prob, mean, std_dev_t) of a stored
    transition under the current weights. ``log_probs`` are NaN at deterministic steps.
    Each sample's noise comes from its own ``step_noise`` stream.
    """

    name = "flow-sde"
    Options = FlowSdeOptions

    def sigma_grid(self, backbone: Backbone) -> torch.Tensor:
        """The (T+1,) grid of FlowMatchEulerDiscreteScheduler with the shift, ending at 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.shift(backbone))
        sched.set_timesteps(self.options.steps)
        return sched.sigmas.float()

    def stochastic_steps(self, num_steps: int) -> list[int]:
        if self.options.noise_level == 0:
            return []
        start, stop = self.options.sde_window or (0, num_steps)
        return list(range(start, min(stop, num_steps)))

    def _transition(self, backbone: Backbone, cond: Conditioning, x: torch.Tensor, sigmas: torch.Tensor,
                    k: int, guidance_scale: float, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of x_{k+1}, std_dev_t) given x_k; one model evaluation."""
        s, s_next = sigmas[k].float(), sigmas[k + 1].float()
        std_dev_t = sde_std(sigmas, k, self.options.noise_level if stochastic else 0.0).to(x.device)
        v = backbone.velocity(x, s, cond, guidance_scale).float()
        return sde_mean(x.float(), v, s.to(x.device), s_next.to(x.device), std_dev_t), std_dev_t

    @staticmethod
    def _step_std(std_dev_t: torch.Tensor, sigmas: torch.Tensor, k: int) -> torch.Tensor:
        """std_dev_t * sqrt(-dt): the standard deviation of x_{k+1} given x_k."""
        return std_dev_t * torch.sqrt(sigmas[k].float() - sigmas[k + 1].float()).to(std_dev_t.device)

    def step_log_prob(self, backbone, cond, x, x_next, sigmas, k, guidance_scale):
        mean, std_dev_t = self._transition(backbone, cond, x, sigmas, k, guidance_scale, stochastic=True)
        return gaussian_log_prob(x_next.float(), mean, self._step_std(std_dev_t, sigmas, k)), mean, std_dev_t

    @torch.no_grad()
    def sample(self, backbone: Backbone, cond: Conditioning, noise: torch.Tensor, *,
               step_noise: SampleNoise | None = None, trajectory: bool = False) -> SampleOutput:
        sigmas = self.sigma_grid(backbone)
        steps = self.options.steps
        noisy = set(self.stochastic_steps(steps))
        if noisy and step_noise is None:
            raise ValueError("flow-sde needs step_noise (one noise stream per sample) for its stochastic steps")
        g = self.guidance(backbone)
        x = noise.float()
        states, log_probs = [x], torch.full((x.shape[0], steps), float("nan"), device=x.device)
        for k in range(steps):
            mean, std_dev_t = self._transition(backbone, cond, x, sigmas, k, g, stochastic=k in noisy)
            if k in noisy:
                step_std = self._step_std(std_dev_t, sigmas, k)
                x = mean + step_std * step_noise.randn(x.shape[1:]).to(x.device)
                log_probs[:, k] = gaussian_log_prob(x, mean, step_std)
            else:
                x = mean
            if trajectory:
                states.append(x)
        traj = torch.stack(states, dim=1) if trajectory else None
        return SampleOutput(latents=x, sigmas=sigmas, trajectory=traj, log_probs=log_probs)
