"""DGPO against independent computations of its equations on a tiny real backbone."""

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from toys import MlpBackbone, batch_slice, load_toy, make_context, plain_advantages, rollout  # noqa: E402

from dgpo_bench.errors import InvalidOptionsError  # noqa: E402
from dgpo_bench_objectives.dgpo import Dgpo  # noqa: E402
from dgpo_bench_samplers.ode import DpmSolver  # noqa: E402

TEXTS = ["cat", "dog", "owl"]
G = 4
REWARDS = [0.1, 0.7, 0.3, 0.9, 0.5, 0.5, 0.2, 0.8, 0.0, 0.6, 0.4, 1.0]


def setup(options, perturb=0.3, step=3, batch=None):
    """A toy backbone moved away from its reference, a rolled-out batch, DGPO and its context."""
    bb = load_toy(MlpBackbone, guidance_scale=2.0)
    sampler = DpmSolver({"steps": 8})
    batch = batch or rollout(bb, sampler, TEXTS, G, REWARDS)
    bb.perturb(perturb)
    obj = Dgpo(options)
    ctx = make_context(bb, sampler, obj, G, len(TEXTS), step=step)
    return bb, batch, obj, ctx


def close(got, want, tol=2e-5):
    """Equal up to float32 rounding, relative to the tensor's largest entry."""
    return bool((got - want).abs().max() <= tol * want.abs().max())


def per_sample(bb, batch, obj, ctx, j, s, weights=None, eps=None):
    """(L, L_ref, v, v_ref) at timestep j, sigma s: plain velocity losses, policy with autograd."""
    if eps is None:
        eps = obj.timestep_noise(ctx, batch.group_ids, j, batch.latents.shape[1:])
    x0 = batch.latents
    x_t, target = (1 - s) * x0 + s * eps, eps - x0
    if weights is None:
        v = bb._velocity(x_t, s.expand(len(x0)), batch.cond)
    else:
        with torch.no_grad(), bb.swapped_weights(weights):
            v = bb._velocity(x_t, s.expand(len(x0)), batch.cond)
    with torch.no_grad(), bb.reference():
        v_ref = bb._velocity(x_t, s.expand(len(x0)), batch.cond)
    mse = lambda a: (a - target).square().flatten(1).mean(1)  # noqa: E731
    return mse(v), mse(v_ref), v, v_ref


@pytest.mark.parametrize("form, micro", [("released", None), ("released", 5), ("released", G), ("paper", None),
                                         ("paper", 5), ("paper", 2 * G)])
def test_surrogate_gradient_is_the_log_sigmoid_gradient(form, micro):
    """Micro-batches of whole groups (4, 8) take s_g from their own pass, as released; 5 splits groups and
    needs one more no-grad policy pass per timestep. All give the same gradient."""
    beta = 200.0
    opts = {"beta_dpo": beta, "beta_kl": 0.0, "trust_region": False, "num_timesteps": 2, "trunc_steps": 3,
            "loss_form": form, "micro_batch_size": micro, "grad_clip": 0.0}
    bb, batch, obj, ctx = setup(opts)
    params = bb.trainable_parameters()
    adv = plain_advantages(REWARDS, G, global_std=True)
    sigmas = obj.draw_timesteps(ctx, batch.sigmas)
    total, s_all = 0.0, []
    for j, s in enumerate(sigmas):
        L, L_ref, _, _ = per_sample(bb, batch, obj, ctx, j, s)
        s_g = beta / G * torch.stack([(adv * (L - L_ref))[batch.group_ids == g].sum() for g in range(3)])
        total = total + (-F.logsigmoid(-s_g)).sum() / len(sigmas)
        s_all.append(s_g.detach())
    assert torch.cat(s_all).abs().max() > 0.2  # the sigmoid weights are far from a constant 1/2
    expected = torch.autograd.grad(total, params)
    nfe = bb.meter.nfe["policy"]
    out = ctx.update(obj, batch)
    extra = 1 if micro == 5 else 0  # the no-grad policy pass for s_g
    assert bb.meter.nfe["policy"] - nfe == (1 + extra) * len(batch) * len(sigmas)
    factor = G / (beta * len(batch)) if form == "released" else 1 / 3
    for got, want in zip(ctx.grads, expected):
        assert close(got, factor * want)
    w = torch.sigmoid(torch.stack(s_all))
    assert out.metrics["group_weight_mean"] == pytest.approx(float(w.mean()), abs=1e-5)
    assert torch.allclose(out.advantages, adv, atol=1e-5)


def test_rollout_noise_trains_each_sample_between_its_own_noise_and_image():
    beta = 200.0
    opts = {"beta_dpo": beta, "beta_kl": 0.0, "trust_region": False, "num_timesteps": 2, "trunc_steps": 3,
            "loss_form": "paper", "grad_clip": 0.0}
    bb, batch, obj, ctx = setup({**opts, "rollout_noise": True})
    adv = plain_advantages(REWARDS, G, global_std=True)
    sigmas = obj.draw_timesteps(ctx, batch.sigmas)
    total = 0.0
    for j, s in enumerate(sigmas):
        L, L_ref, _, _ = per_sample(bb, batch, obj, ctx, j, s, eps=batch.noise)
        s_g = beta / G * torch.stack([(adv * (L - L_ref))[batch.group_ids == g].sum() for g in range(3)])
        total = total + (-F.logsigmoid(-s_g)).sum() / len(sigmas)
    expected = [g / 3 for g in torch.autograd.grad(total, bb.trainable_parameters())]
    ctx.update(obj, batch)
    _, _, fresh_obj, fresh_ctx = setup(opts, batch=batch)
    fresh_ctx.update(fresh_obj, batch)
    for own, fresh, want in zip(ctx.grads, fresh_ctx.grads, expected):
        assert close(own, want)
        assert not close(fresh, want)


def test_noise_shared_within_a_group_fresh_across_groups_and_timesteps():
    bb, batch, obj, ctx = setup({})
    shape = batch.latents.shape[1:]
    gids = batch.group_ids
    e0, e1 = obj.timestep_noise(ctx, gids, 0, shape), obj.timestep_noise(ctx, gids, 1, shape)
    for e in (e0, e1):
        for g in range(3):
            rows = e[gids == g]
            assert torch.equal(rows, rows[:1].expand_as(rows))
        assert not torch.allclose(e[0], e[G]) and not torch.allclose(e[G], e[2 * G])
    assert not torch.allclose(e0, e1)
    # a process holding part of a group draws the same noise for it
    assert torch.equal(obj.timestep_noise(ctx, gids[5:9], 0, shape), e0[5:9])
    unshared = Dgpo({"shared_noise": False}).timestep_noise(ctx, gids, 0, shape)
    assert len({tuple(r.flatten()[:3].tolist()) for r in unshared}) == len(gids)


@pytest.mark.parametrize("sampling", ["grid", "uniform"])
def test_trained_timesteps_stay_in_the_allowed_pool(sampling):
    bb, batch, obj, ctx = setup({"trunc_steps": 2, "num_timesteps": 2, "timestep_sampling": sampling})
    pool = batch.sigmas[:3]
    seen = set()
    for step in range(40):
        ctx.step = step
        drawn = obj.draw_timesteps(ctx, batch.sigmas)
        assert len(drawn) == 2
        if sampling == "grid":
            assert len(set(drawn.tolist())) == 2 and set(drawn.tolist()) <= set(pool.tolist())
        else:
            assert ((drawn >= pool[-1]) & (drawn <= pool[0])).all()
        seen |= set(drawn.tolist())
    if sampling == "grid":
        assert seen == set(pool.tolist())
    # every model evaluation of a training step happens at a drawn sigma
    ctx.step = 7
    drawn = obj.draw_timesteps(ctx, batch.sigmas)
    bb.seen_sigmas.clear()
    ctx.update(obj, batch)
    used = torch.cat(bb.seen_sigmas).unique()
    assert torch.allclose(used, drawn.sort().values)


def test_trust_region_detaches_exactly_the_samples_outside_it():
    beta, beta_kl = 50.0, 0.05
    bb, batch, obj, ctx = setup({"beta_dpo": beta, "beta_kl": beta_kl, "num_timesteps": 1, "trunc_steps": 3,
                                 "grad_clip": 0.0, "clip_range": 0.0})
    params = bb.trainable_parameters()
    # the fast EMA lags behind the policy: an older, different set of weights
    old = [p.detach() + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
           for i, p in enumerate(params)]
    obj.load_state_dict({"fast_ema": old})
    adv = plain_advantages(REWARDS, G, global_std=True)
    (s,) = obj.draw_timesteps(ctx, batch.sigmas)
    L_old, _, _, _ = per_sample(bb, batch, obj, ctx, 0, s, weights=old)
    L, L_ref, v, v_ref = per_sample(bb, batch, obj, ctx, 0, s)
    rho = torch.exp(L_old - L.detach())
    clip = float((rho - 1).abs().median())
    obj.options.clip_range = clip
    outside = torch.tensor([(a > 0 and r > 1 + clip) or (a <= 0 and r < 1 - clip) for a, r in zip(adv, rho)])
    assert 0 < outside.sum() < len(outside)
    s_g = beta / G * torch.stack([(adv * (L - L_ref)).detach()[batch.group_ids == g].sum() for g in range(3)])
    w = torch.sigmoid(s_g)[batch.group_ids]
    kept = (~outside).float()
    loss = (w * adv * L * kept).mean() + beta_kl * (v - v_ref).square().flatten(1).mean(1).mean()
    expected = torch.autograd.grad(loss, params)
    out = ctx.update(obj, batch)
    for got, want in zip(ctx.grads, expected):
        assert close(got, want)
    assert out.metrics["clip_frac"] == pytest.approx(float(outside.float().mean()))
    assert out.metrics["ratio_min"] == pytest.approx(float(rho.min()), rel=1e-5)


def test_fast_ema_update_and_rollout_switch():
    bb, batch, obj, ctx = setup({"ema_rollout_after": 5, "lr": 1e-2})
    before = [t.clone() for t in obj.fast_ema.tensors]
    ctx.step = 100
    ctx.update(obj, batch)
    decay = min(0.3, 0.001 * 100)
    for e, b, p in zip(obj.fast_ema.tensors, before, bb.trainable_parameters()):
        assert torch.allclose(e, decay * b + (1 - decay) * p.detach(), atol=1e-6)
    # as released (global_step > switch_ema_ref): steps 0..5 (0-based) roll out with the current weights
    for k in range(8):
        ctx.step = k
        with obj.rollout_weights(ctx):
            assert bb.role == ("ema" if k >= 6 else "policy"), k
            if k >= 6:
                assert all(torch.equal(p, e) for p, e in zip(bb.trainable_parameters(), obj.fast_ema.tensors))
    never = Dgpo({"ema_rollout_after": None})
    never.setup(ctx)
    ctx.step = 10**6
    with never.rollout_weights(ctx):
        assert bb.role == "policy"
    restored = Dgpo({})
    make_context(bb, ctx.sampler, restored, G, 3)
    restored.load_state_dict(obj.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.fast_ema.tensors, obj.fast_ema.tensors))


def test_timestep_pool_options_and_short_grids():
    with pytest.raises(InvalidOptionsError, match="num_timesteps"):
        Dgpo({"num_timesteps": 5, "trunc_steps": 2})
    with pytest.raises(InvalidOptionsError, match="shared_noise=false has no effect with rollout_noise"):
        Dgpo({"rollout_noise": True, "shared_noise": False})
    bb = load_toy(MlpBackbone)
    obj = Dgpo({"trunc_steps": 6, "num_timesteps": 4})
    ctx = make_context(bb, DpmSolver({"steps": 3}), obj, G, 3)
    sigmas = DpmSolver({"steps": 3}).sample(bb, bb.encode_prompts(["a"]), torch.randn(1, 2, 4, 4)).sigmas
    drawn = obj.draw_timesteps(ctx, sigmas)  # a 3-step grid offers 3 points, never the final sigma 0
    assert sorted(drawn.tolist()) == sorted(sigmas[:3].tolist())


# --------------------------------------------------------------------------- two processes


SPLIT_OPTIONS = {"beta_dpo": 200.0, "beta_kl": 0.01, "num_timesteps": 2, "trunc_steps": 3, "grad_clip": 0.0}


def _two_process_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    bb, batch, obj, ctx = setup(SPLIT_OPTIONS, batch=torch.load(os.path.join(out_dir, "batch.pt"), weights_only=False))
    # 12 samples in groups of 4: rank 0 holds group 0 and half of group 1, rank 1 the rest
    out = ctx.update(obj, batch_slice(batch, slice(6 * rank, 6 * rank + 6)))
    grads = acc.reduce(torch.cat([g.flatten() for g in ctx.grads]), reduction="mean")
    adv = acc.gather(out.advantages)
    if rank == 0:
        torch.save({"grads": grads, "adv": adv, "metrics": out.metrics}, os.path.join(out_dir, "two.pt"))
    acc.wait_for_everyone()
    acc.end_training()  # a process that exits with gloo still up can abort ("terminate called ...")
    # even with the group destroyed, interpreter teardown in a spawned child sometimes aborts the
    # same way inside the full suite; the results are saved, so leave without running it
    os._exit(0)


def test_group_split_across_two_processes_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bb, batch, obj, ctx = setup(SPLIT_OPTIONS)
    torch.save(batch, tmp_path / "batch.pt")
    mp.spawn(_two_process_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt")
    out = ctx.update(obj, batch)
    one = torch.cat([g.flatten() for g in ctx.grads])
    assert close(two["grads"], one)
    assert torch.allclose(two["adv"], out.advantages, atol=1e-6)
    for key in ("group_weight_mean", "group_weight_min", "group_weight_max", "s_g_abs_mean", "kl", "pref_loss"):
        assert two["metrics"][key] == pytest.approx(out.metrics[key], rel=1e-5, abs=1e-9), key
