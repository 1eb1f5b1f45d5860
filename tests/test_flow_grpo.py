"""Flow-GRPO against independent computations: on-policy ratios, the PPO loss, trained steps, pairings."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from toys import MlpBackbone, load_toy, make_context, plain_advantages, rollout  # noqa: E402

from dgpo_bench.errors import IncompatibleComponentsError  # noqa: E402
from dgpo_bench.resolve import build_spec, resolve  # noqa: E402
from dgpo_bench_objectives.advantages import group_advantages  # noqa: E402
from dgpo_bench_objectives.flow_grpo import FlowGrpo  # noqa: E402
from dgpo_bench_samplers.ode import DpmSolver, OdeEuler  # noqa: E402
from dgpo_bench_samplers.sde import FlowSde  # noqa: E402

TEXTS = ["sun", "moon"]
G = 4
REWARDS = [0.2, 0.9, 0.4, 0.6, 0.0, 1.0, 0.5, 0.5]


def setup(options, steps=4, sampler_options=None, step=0):
    bb = load_toy(MlpBackbone, guidance_scale=1.5)
    sampler = FlowSde({"steps": steps, "shift": 3.0, **(sampler_options or {})})
    batch = rollout(bb, sampler, TEXTS, G, REWARDS, trajectory=True)
    obj = FlowGrpo(options)
    ctx = make_context(bb, sampler, obj, G, len(TEXTS), step=step)
    return bb, sampler, batch, obj, ctx


def test_first_on_policy_pass_gives_ratio_exactly_one():
    bb, sampler, batch, obj, ctx = setup({"beta_kl": 0.04})
    out = ctx.update(obj, batch)
    assert out.metrics["ratio_min"] == 1.0 and out.metrics["ratio_max"] == 1.0
    assert out.metrics["clip_frac"] == 0.0 and out.metrics["approx_kl"] == 0.0
    assert out.metrics["trained_steps"] == 3  # int(4 * 0.99) = 3 steps: 0, 1, 2


def plain_log_prob(bb, batch, k, g, reference=False):
    """Flow-GRPO's transition density written out: (log-prob (B,), mean, std_dev_t)."""
    s = batch.sigmas.double()
    x, x_next = batch.trajectory[:, k], batch.trajectory[:, k + 1]
    std_dev_t = 0.7 * math.sqrt(s[k] / (1 - (s[1] if s[k] == 1 else s[k])))
    dt = float(s[k + 1] - s[k])
    sig = torch.full((len(x),), float(s[k]))
    with bb.reference() if reference else torch.enable_grad():
        v_c = bb._velocity(x, sig, batch.cond)
        v_u = bb._velocity(x, sig, bb.null_conditioning(len(x)))
    v = v_u + g * (v_c - v_u)
    sk = float(s[k])
    mean = x * (1 + std_dev_t**2 / (2 * sk) * dt) + v * (1 + std_dev_t**2 * (1 - sk) / (2 * sk)) * dt
    std = std_dev_t * math.sqrt(-dt)
    logp = (-(x_next - mean) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    return logp, mean, std_dev_t


@pytest.mark.parametrize("drop", [True, False])
def test_ppo_clipped_gradient_matches_hand_computation(drop):
    """Off-policy stored log-probs engage the clip; the gradient is that of the written-out loss, averaged
    over the samples whose advantage is not 0 (released) or over all of them (drop_zero_advantage=false).
    The second group's rewards 0.5 equal its mean: those two samples have advantage exactly 0."""
    eps, beta = 0.05, 0.3
    bb, sampler, batch, obj, ctx = setup({"beta_kl": beta, "clip_range": eps, "global_std": False,
                                          "grad_clip": 0.0, "drop_zero_advantage": drop})
    bb.perturb(0.1)  # the policy moved since the rollout; the reference did not
    params = bb.trainable_parameters()
    shift = 0.1 * torch.randn(batch.log_probs.shape, generator=torch.Generator().manual_seed(3))
    batch.log_probs = batch.log_probs + shift
    adv = plain_advantages(REWARDS, G, global_std=False)
    keep = adv != 0 if drop else torch.ones(len(adv), dtype=torch.bool)
    assert int(keep.sum()) == (6 if drop else 8)
    total, ratios = 0.0, []
    for k in range(3):
        logp, mean, std_dev_t = plain_log_prob(bb, batch, k, 1.5)
        with torch.no_grad():
            _, mean_ref, _ = plain_log_prob(bb, batch, k, 1.5, reference=True)
        ratio = torch.exp(logp - batch.log_probs[:, k])
        ppo = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps))[keep].mean()
        kl = ((mean - mean_ref) ** 2).flatten(1).mean(1)[keep].mean() / (2 * std_dev_t**2)
        total = total + (ppo + beta * kl) / 3
        ratios.append(ratio.detach()[keep])
    r = torch.cat(ratios)
    clipped = ((r - 1).abs() > eps).float().mean()
    assert 0 < clipped < 1
    expected = torch.autograd.grad(total, params)
    out = ctx.update(obj, batch)
    for got, want in zip(ctx.grads, expected):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert out.metrics["clip_frac"] == pytest.approx(float(clipped))
    assert out.metrics["ratio_max"] == pytest.approx(float(r.max()), rel=1e-5)
    assert out.metrics["kept_frac"] == (0.75 if drop else 1.0)


def test_a_group_whose_rewards_are_all_equal_costs_no_passes():
    """As released, zero-advantage samples are not re-scored: with micro-batches of 2, the 4 samples of a
    uniform group are skipped and the update takes 2 passes per trained step instead of 4."""
    bb = load_toy(MlpBackbone, guidance_scale=1.5)
    sampler = FlowSde({"steps": 4, "shift": 3.0})
    batch = rollout(bb, sampler, TEXTS, G, [0.2, 0.9, 0.4, 0.6, 0.5, 0.5, 0.5, 0.5], trajectory=True)
    for drop, passes in ((True, 2), (False, 4)):
        obj = FlowGrpo({"micro_batch_size": 2, "drop_zero_advantage": drop})
        ctx = make_context(bb, sampler, obj, G, len(TEXTS))
        nfe = bb.meter.nfe["policy"]
        assert obj.update(batch, ctx).passes == 3 * passes
        out = ctx.update(obj, batch)
        assert bb.meter.nfe["policy"] - nfe == 3 * passes * 2 * 2  # 3 steps, 2 samples a pass, CFG doubles
        assert out.metrics["kept_frac"] == (0.5 if drop else 1.0)


@pytest.mark.parametrize("window, trained", [(None, 9), ((2, 5), 3)])
def test_trains_steps_0_to_8_of_10_or_the_sde_window(window, trained):
    bb, sampler, batch, obj, ctx = setup({"micro_batch_size": 3}, steps=10,
                                         sampler_options={"sde_window": window} if window else {})
    before = dict(bb.meter.nfe)
    out = ctx.update(obj, batch)
    n = len(batch) - 2  # the two samples whose reward equals their group's mean are not trained
    assert out.metrics["trained_steps"] == trained
    assert bb.meter.nfe["policy"] - before.get("policy", 0) == 2 * n * trained  # CFG in the recompute
    assert bb.meter.nfe["reference"] - before.get("reference", 0) == 2 * n * trained


def test_group_advantages_global_or_per_group_std_and_clamp():
    rng = np.random.default_rng(0)
    rewards = rng.random(12).tolist()
    gids = torch.arange(12) // 4
    for global_std in (True, False):
        got = group_advantages(torch.tensor(rewards), gids, global_std=global_std)
        assert torch.allclose(got, plain_advantages(rewards, 4, global_std), atol=1e-5)
    # one outlier in a group of 36: per-group std gives sqrt(35) > 5, clamped; an all-equal group is 0
    outlier = [0.0] * 35 + [1.0] + [0.3] * 36
    got = group_advantages(torch.tensor(outlier), torch.arange(72) // 36, global_std=False)
    assert got[35] == pytest.approx(5.0) and got[:35].abs().max() < 0.2
    assert torch.equal(got[36:], torch.zeros(36))


def test_objective_sampler_pairs_are_checked_before_loading(components):
    def spec(objective, sampler=None):
        user = {"objective": {"name": objective}}
        if sampler:
            user["sampler"] = {"name": sampler}
        return build_spec(components, user)[0]

    with pytest.raises(IncompatibleComponentsError, match="log_probs.*flow-sde"):
        resolve(components, spec("flow-grpo", "ode-euler"))
    with pytest.raises(IncompatibleComponentsError):
        resolve(components, spec("flow-grpo", "dpm-solver"))
    assert resolve(components, spec("flow-grpo")).sampler[0] is FlowSde
    assert resolve(components, spec("dgpo")).sampler[0] is DpmSolver
    assert resolve(components, spec("diffusion-dpo", "ode-euler")).sampler[0] is OdeEuler
    assert resolve(components, spec("dgpo", "flow-sde")).sampler[0] is FlowSde  # an SDE also gives final samples
    assert FlowGrpo.needs_trajectory and FlowGrpo.requires == {"log_probs"}
