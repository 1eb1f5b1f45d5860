"""Deterministic samplers of the flow ODE that wrap diffusers schedulers."""

from __future__ import annotations

import torch

from dgpo_bench.contracts import Backbone, Conditioning, SampleNoise, SampleOutput, Sampler


class SchedulerSampler(Sampler):
    """Integrates dx/ds = v from sigma 1 to 0 with a diffusers scheduler's ``step``.

    The model is evaluated at the scheduler's float sigmas, with CFG against the empty
    prompt when the guidance scale is not 1.
    """

    def make_scheduler(self, shift: float):
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, backbone: Backbone, cond: Conditioning, noise: torch.Tensor, *,
               step_noise: SampleNoise | None = None, trajectory: bool = False) -> SampleOutput:
        sched = self.make_scheduler(self.shift(backbone))
        sched.set_timesteps(self.options.steps, device=noise.device)
        sigmas = sched.sigmas.float()
        g = self.guidance(backbone)
        x = noise.float()
        states = [x]
        for k, t in enumerate(sched.timesteps):
            v = backbone.velocity(x, sigmas[k], cond, g).float()
            x = sched.step(v, t, x, return_dict=False)[0].float()
            if trajectory:
                states.append(x)
        traj = torch.stack(states, dim=1) if trajectory else None
        return SampleOutput(latents=x, sigmas=sigmas.cpu(), trajectory=traj)


class OdeEuler(SchedulerSampler):
    """Flow-matching Euler on the shifted grid (diffusers FlowMatchEulerDiscreteScheduler)."""

    name = "ode-euler"

    def make_scheduler(self, shift: float):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class DpmSolver(SchedulerSampler):
    """DPM-Solver++ 2M on the flow ODE (diffusers DPMSolverMultistepScheduler, flow sigmas);
    DGPO's rollout sampler."""

    name = "dpm-solver"

    def make_scheduler(self, shift: float):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                           use_flow_sigmas=True, flow_shift=shift, algorithm_type="dpmsolver++",
                                           solver_order=2, lower_order_final=True, final_sigmas_type="zero")
