"""Samplers against plainly written reference integrators and an analytic Gaussian flow."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from toys import GaussianFlowBackbone, MlpBackbone, load_toy  # noqa: E402

from dgpo_bench.contracts import SampleNoise  # noqa: E402
from dgpo_bench_samplers.ode import DpmSolver, OdeEuler  # noqa: E402
from dgpo_bench_samplers.sde import FlowSde  # noqa: E402

PROMPTS = ["red", "blue", "green"]


def cfg_velocity(bb, x, s, cond, g):
    """v_uncond + g (v_cond - v_uncond), evaluated without going through the sampler."""
    sig = torch.full((x.shape[0],), float(s))
    v_c = bb._velocity(x, sig, cond)
    v_u = bb._velocity(x, sig, bb.null_conditioning(x.shape[0]))
    return v_u + g * (v_c - v_u)


def euler_grid(steps, shift):
    """The SD3 pipeline's grid: linspace(1, shifted(1/1000), T), shifted, then 0."""
    def sh(x):
        return shift * x / (1 + (shift - 1) * x)
    return np.append(sh(np.linspace(1.0, sh(1 / 1000), steps)), 0.0)


def setup_mlp(n=3, g=2.5):
    bb = load_toy(MlpBackbone, guidance_scale=g)
    cond = bb.encode_prompts(PROMPTS[:n])
    noise = torch.randn(n, *bb.latent_shape, generator=torch.Generator().manual_seed(1))
    return bb, cond, noise


def test_dpm_grid_is_dgpo_rollout_grid():
    bb = load_toy(MlpBackbone)
    out = DpmSolver({"steps": 10, "shift": 3.0}).sample(bb, bb.encode_prompts(["a"]), torch.randn(1, 2, 4, 4))
    expected = [0.9997, 0.964, 0.923, 0.875, 0.818, 0.750, 0.666, 0.562, 0.428, 0.250, 0.0]
    assert out.sigmas.tolist() == pytest.approx(expected, abs=6e-4)


def test_euler_equals_plain_euler_with_cfg_and_counts_nfe():
    bb, cond, noise = setup_mlp()
    steps, shift, g = 6, 3.0, 2.5
    out = OdeEuler({"steps": steps, "shift": shift}).sample(bb, cond, noise, trajectory=True)
    grid = euler_grid(steps, shift)
    assert out.sigmas.tolist() == pytest.approx(grid.tolist(), abs=1e-6)
    x = noise.clone()
    ref = [x]
    with torch.no_grad():
        for k in range(steps):
            x = x + (grid[k + 1] - grid[k]) * cfg_velocity(bb, x, grid[k], cond, g)
            ref.append(x)
    assert torch.allclose(out.latents, x, atol=1e-5)
    assert torch.allclose(out.trajectory, torch.stack(ref, 1), atol=1e-5)
    assert out.trajectory.shape == (3, steps + 1, *bb.latent_shape)
    assert bb.meter.nfe["policy"] == 2 * 3 * steps  # CFG: two evaluations per sample and step


def test_dpm_solver_equals_plain_dpm_solver_pp_2m():
    bb, cond, noise = setup_mlp(g=1.5)
    steps, shift, g = 8, 3.0, 1.5
    out = DpmSolver({"steps": steps, "shift": shift}).sample(bb, cond, noise, trajectory=True)
    s = out.sigmas.double()
    # DPM-Solver++(2M) in data prediction: x0 = x - s v, lambda = log((1 - s) / s); first and last steps first order.
    x, prev_x0, prev_h = noise.double(), None, None
    with torch.no_grad():
        for k in range(steps):
            x0 = x - s[k] * cfg_velocity(bb, x.float(), float(s[k]), cond, g).double()
            if k == steps - 1:  # to sigma 0: the first-order update lands on x0
                x = x0
                break
            lam = lambda u: math.log((1 - u) / u)  # noqa: E731
            h = lam(s[k + 1]) - lam(s[k])
            d = x0 if prev_x0 is None else x0 + 0.5 * (h / prev_h) * (x0 - prev_x0)
            x = (s[k + 1] / s[k]) * x - (1 - s[k + 1]) * (math.exp(-h) - 1) * d
            prev_x0, prev_h = x0, h
    assert torch.allclose(out.latents.double(), x, atol=1e-5)


def test_sde_log_prob_is_the_gaussian_density():
    bb, cond, noise = setup_mlp(g=1.5)
    sampler = FlowSde({"steps": 4, "shift": 3.0, "noise_level": 0.7})
    out = sampler.sample(bb, cond, noise, step_noise=SampleNoise([5, 6, 7]), trajectory=True)
    s = out.sigmas.double()
    assert s[0] == 1.0
    for k in range(4):
        x, x_next = out.trajectory[:, k], out.trajectory[:, k + 1]
        denominator = 1 - (s[1] if k == 0 else s[k])
        std_dev_t = 0.7 * math.sqrt(s[k] / denominator)
        dt = s[k + 1] - s[k]
        with torch.no_grad():
            v = cfg_velocity(bb, x, float(s[k]), cond, 1.5).double()
        mean = x.double() * (1 + std_dev_t**2 / (2 * s[k]) * dt) + v * (1 + std_dev_t**2 * (1 - s[k]) / (2 * s[k])) * dt
        dist = torch.distributions.Normal(mean, std_dev_t * math.sqrt(-dt))
        expected = dist.log_prob(x_next.double()).flatten(1).mean(1)
        assert torch.allclose(out.log_probs[:, k].double(), expected, atol=1e-5), k
        # the noise that moved x_k to x_{k+1} is the k-th draw of each sample's own stream
        draws = []
        for seed in (5, 6, 7):
            gen = torch.Generator().manual_seed(seed)
            draws.append([torch.randn(*bb.latent_shape, generator=gen) for _ in range(k + 1)][k])
        draws = torch.stack(draws)
        assert torch.allclose((x_next.double() - mean) / (std_dev_t * math.sqrt(-dt)), draws.double(), atol=1e-4)
        # re-scoring the stored transition under the same weights reproduces the rollout log-prob exactly
        logp, _, _ = sampler.step_log_prob(bb, cond, x, x_next, out.sigmas, k, 1.5)
        assert torch.equal(logp, out.log_probs[:, k])


def test_sde_sample_does_not_depend_on_batch_composition():
    bb, cond, noise = setup_mlp(g=1.5)
    sampler = FlowSde({"steps": 5})
    full = sampler.sample(bb, cond, noise, step_noise=SampleNoise([11, 12, 13]))
    alone = sampler.sample(bb, cond.select([1]), noise[1:2], step_noise=SampleNoise([12]))
    assert torch.allclose(full.latents[1:2], alone.latents, atol=1e-6)
    assert torch.allclose(full.log_probs[1:2], alone.log_probs, atol=1e-6)


def test_sde_window_uses_euler_outside_it():
    bb, cond, noise = setup_mlp(g=1.0)
    sampler = FlowSde({"steps": 6, "sde_window": [2, 4]})
    assert sampler.stochastic_steps(6) == [2, 3]
    out = sampler.sample(bb, cond, noise, step_noise=SampleNoise([1, 2, 3]), trajectory=True)
    s = out.sigmas
    for k in range(6):
        x = out.trajectory[:, k]
        with torch.no_grad():
            euler = x + (s[k + 1] - s[k]) * cfg_velocity(bb, x, float(s[k]), cond, 1.0)
        if k in (2, 3):
            assert torch.isfinite(out.log_probs[:, k]).all()
            assert not torch.allclose(out.trajectory[:, k + 1], euler, atol=1e-3)
        else:
            assert torch.isnan(out.log_probs[:, k]).all()
            assert torch.allclose(out.trajectory[:, k + 1], euler, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sde_and_ode_share_the_marginals_of_an_analytic_flow(shift):
    """N(0, I) -> N(mu, s0^2 I) with the exact velocity: x_s ~ N((1 - s) mu, (1 - s)^2 s0^2 + s^2)."""
    n, s0 = 2000, 0.5
    bb = load_toy(GaussianFlowBackbone, latent_shape=(1, 4, 4), data_std=s0)
    cond = bb.encode_prompts(["a"]).repeat_interleave(n)
    mu = float(bb.mu(cond)[0].detach())
    noise = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = 100
    sde = FlowSde({"steps": steps, "shift": shift}).sample(bb, cond, noise, step_noise=SampleNoise(range(n)),
                                                            trajectory=True)
    ode = DpmSolver({"steps": steps, "shift": shift}).sample(bb, cond, noise, trajectory=True)
    se_mean, se_std = s0 / math.sqrt(n * 16), s0 / math.sqrt(2 * n * 16)
    for out in (sde, ode):
        x = out.latents
        assert abs(x.mean().item() - mu) < 5 * se_mean
        assert abs(x.std().item() - s0) < 5 * se_std + 0.005
        # an intermediate time; the SDE's coarse first step (std singular at s = 1) fades out by here
        k = 3 * steps // 4
        s = float(out.sigmas[k])
        xk, std_k = out.trajectory[:, k], math.sqrt(((1 - s) * s0) ** 2 + s**2)
        assert abs(xk.mean().item() - (1 - s) * mu) < 5 * std_k / math.sqrt(n * 16)
        assert abs(xk.std().item() - std_k) < 0.012
    assert abs(sde.latents.std().item() - ode.latents.std().item()) < 0.01
