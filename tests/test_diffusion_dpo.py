"""Online Diffusion-DPO against hand computations: pairs, the loss, its gradient and implicit accuracy."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from toys import MlpBackbone, load_toy, make_context, rollout  # noqa: E402

from dgpo_bench_objectives.diffusion_dpo import DiffusionDpo, dpo_loss, select_pairs  # noqa: E402
from dgpo_bench_samplers.ode import OdeEuler  # noqa: E402

TEXTS = ["tree", "lake", "hill"]
G = 4
# group 0: a tie for best (first one wins); group 1: all equal (no pair); group 2: distinct
REWARDS = [0.1, 0.9, 0.5, 0.9, 0.4, 0.4, 0.4, 0.4, 0.8, 0.3, 0.6, 0.2]


def test_pairs_are_the_best_and_worst_of_each_group():
    win, lose, valid = select_pairs(torch.tensor(REWARDS), torch.arange(12) // G, 3)
    assert win.tolist()[0] == 1 and lose.tolist()[0] == 0
    assert win.tolist()[2] == 8 and lose.tolist()[2] == 11
    assert valid.tolist() == [True, False, True]
    # group members need not be contiguous (e.g. after gathering from several processes)
    gids = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1])
    r = torch.tensor([0.5, 0.2, 0.9, 0.7, 0.1, 0.3, 0.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    win, lose, valid = select_pairs(r, gids, 3)
    assert win.tolist() == [3, 2, 7] and lose.tolist() == [6, 11, 4] and valid.all()


def test_loss_equals_hand_computation_on_fixed_inputs():
    L_w, L_l = torch.tensor([0.50, 0.30]), torch.tensor([0.70, 0.20])
    L_w_ref, L_l_ref = torch.tensor([0.60, 0.25]), torch.tensor([0.60, 0.26])
    loss, inside = dpo_loss(L_w, L_l, L_w_ref, L_l_ref, beta=10.0)
    # pair 1: -5 * ((0.5 - 0.7) - (0.6 - 0.6)) = 1.0; pair 2: -5 * ((0.3 - 0.2) - (0.25 - 0.26)) = -0.55
    assert inside.tolist() == pytest.approx([1.0, -0.55])
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.55))])


@pytest.mark.parametrize("sampling", ["uniform", "logit-normal"])
def test_train_step_matches_hand_computation(sampling):
    beta = 40.0
    bb = load_toy(MlpBackbone, guidance_scale=2.0)
    sampler = OdeEuler({"steps": 4})
    batch = rollout(bb, sampler, TEXTS, G, REWARDS)
    bb.perturb(0.2)
    obj = DiffusionDpo({"beta": beta, "grad_clip": 0.0, "timestep_sampling": sampling, "micro_batch_size": 1})
    ctx = make_context(bb, sampler, obj, G, 3)
    params = bb.trainable_parameters()
    sigmas, noise = obj.pair_sigmas(ctx), obj.pair_noise(ctx, batch.latents.shape[1:])
    losses, insides = [], []
    for g, (w, l_) in {0: (1, 0), 2: (8, 11)}.items():  # group 1 has no preference
        s, eps = sigmas[g], noise[g]

        def mse(i, reference=False):
            x0 = batch.latents[i:i + 1]
            x_t = (1 - s) * x0 + s * eps
            with bb.reference() if reference else torch.enable_grad():
                v = bb._velocity(x_t, s.reshape(1), batch.cond.select([i]))
            return (v - (eps - x0)).square().mean()

        with torch.no_grad():
            ref_diff = mse(w, True) - mse(l_, True)
        inside = -beta / 2 * ((mse(w) - mse(l_)) - ref_diff)
        losses.append(-F.logsigmoid(inside))
        insides.append(inside.detach())
    loss = torch.stack(losses).mean()
    expected = torch.autograd.grad(loss, params)
    out = ctx.update(obj, batch)
    assert out.metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert out.metrics["implicit_acc"] == pytest.approx(float((torch.stack(insides) > 0).float().mean()))
    assert out.metrics["pairs"] == 2
    for got, want in zip(ctx.grads, expected):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_logit_normal_timesteps_follow_their_distribution():
    bb = load_toy(MlpBackbone)
    obj = DiffusionDpo({"timestep_sampling": "logit-normal", "logit_mean": 0.5, "logit_std": 0.8})
    ctx = make_context(bb, OdeEuler({}), obj, 2, 4000)
    logits = torch.logit(obj.pair_sigmas(ctx).double())
    assert abs(float(logits.mean()) - 0.5) < 4 * 0.8 / math.sqrt(4000)
    assert abs(float(logits.std()) - 0.8) < 0.05
