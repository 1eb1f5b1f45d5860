"""Framework overhead: a DGPO step through the engine vs a hand-written PyTorch loop.

    python benchmarks/engine_overhead.py [--repeats 5]

Both sides run the same work on the same nano model in one process, alternating:
the rollout (DPM-Solver++ 2M, 10 steps, CFG, 32 images: 4 prompts x 8 samples, as recorded) and the DGPO optimizer step
(4 timesteps; reference, fast-EMA and policy passes; backward; AdamW; EMA update). The
engine side goes through the plugins (sampler, backbone contract with its cost meter,
the dgpo objective and EngineContext); the hand side calls the diffusers transformer
and scheduler directly. Prints the medians and their ratio (goal: <= 1.03).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(seed: int = 0):
    from dgpo_bench.engine import Engine
    from dgpo_bench.plugins import get_plugin_manager, load_components
    from dgpo_bench.resolve import build_spec, resolve

    comps = load_components(get_plugin_manager())
    spec, notes = build_spec(comps, {"objective": {"name": "dgpo"}, "rewards": [{"name": "ocr"}], "seed": seed,
                                     "group_size": 8, "prompts_per_step": 4, "eval": {"prompts": 1}})
    engine = Engine(resolve(comps, spec, notes), run_dir="/tmp/dgpo-bench-overhead", progress=False)
    engine.build()
    return engine


def hand_rollout(model, scheduler_factory, ehs, pooled, null_ehs, null_pooled, noise, guidance, steps):
    sched = scheduler_factory()
    sched.set_timesteps(steps)
    x = noise
    b = x.shape[0]
    for k, t in enumerate(sched.timesteps):
        s = sched.sigmas[k].float().expand(b)
        v = model(torch.cat([x, x]), torch.cat([s, s]), torch.cat([null_ehs, ehs]), torch.cat([null_pooled, pooled]))
        vu, vc = v.chunk(2)
        x = sched.step(vu + guidance * (vc - vu), t, x, return_dict=False)[0]
    return x


def hand_dgpo_step(model, frozen, ema, opt, x0, ehs, pooled, adv, gids, sigmas, noises, o, group_size, step):
    """The released DGPO update written directly against the transformer."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = x0.shape[0]
    for s, eps in zip(sigmas, noises):
        x_t = (1 - s) * x0 + s * eps
        target = eps - x0
        sb = s.expand(n)
        with torch.no_grad():
            v_ref = frozen(x_t, sb, ehs, pooled)
            l_ref = (v_ref - target).square().flatten(1).mean(1)
            l_old = (ema(x_t, sb, ehs, pooled) - target).square().flatten(1).mean(1)
        v = model(x_t, sb, ehs, pooled)
        loss_i = (v - target).square().flatten(1).mean(1)
        s_g = torch.zeros(int(gids.max()) + 1).index_add(0, gids, adv * (loss_i.detach() - l_ref)) * (o.beta_dpo / group_size)
        w = torch.sigmoid(s_g)[gids]
        rho = torch.exp(l_old - loss_i.detach())
        clipped = torch.where(adv > 0, rho > 1 + o.clip_range, rho < 1 - o.clip_range)
        loss_used = torch.where(clipped, loss_i.detach(), loss_i)
        kl = (v - v_ref).square().flatten(1).mean(1)
        ((w * adv * loss_used).sum() / n + o.beta_kl * kl.sum() / n).div(len(sigmas)).backward()
    torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    decay = min(o.fast_ema_max_decay, o.fast_ema_decay_rate * step)
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(p, alpha=1 - decay)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    engine = build()
    bb, objective, ctx, sampler = engine.backbone, engine.objective, engine.ctx, engine.sampler
    (batch,), _ = engine.rollout(0)
    o = objective.options

    # Hand side: the same transformer weights, its own frozen and EMA copies and optimizer.
    model = copy.deepcopy(bb.model)
    model.text_encoder.requires_grad_(False)
    frozen, ema = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    hand_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(hand_params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    ehs, pooled = batch.cond.tensors["encoder_hidden_states"], batch.cond.tensors["pooled_projections"]
    null = bb.null_conditioning(len(batch))
    from dgpo_bench_objectives.advantages import local_advantages

    adv = local_advantages(batch, global_std=o.global_std, clip=o.adv_clip)
    gids = batch.group_ids.long()
    sigmas = objective.draw_timesteps(ctx, batch.sigmas)
    noises = [objective.timestep_noise(ctx, gids, j, batch.latents.shape[1:]) for j in range(len(sigmas))]
    guidance = sampler.guidance(bb)
    dpm = sampler.make_scheduler

    times: dict[str, list[float]] = {k: [] for k in ("engine_rollout", "hand_rollout", "engine_step", "hand_step")}

    def timed(key, fn):
        t0 = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - t0)

    # the hand side uses the same bf16 autocast setting as the backbone
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bb._autocast)
    for r in range(args.repeats):
        with torch.no_grad(), autocast:
            timed("engine_rollout", lambda: sampler.sample(bb, batch.cond, batch.noise))
            timed("hand_rollout", lambda: hand_rollout(model, lambda: dpm(sampler.shift(bb)), ehs, pooled,
                                                       null.tensors["encoder_hidden_states"],
                                                       null.tensors["pooled_projections"], batch.noise, guidance,
                                                       sampler.options.steps))
        ctx.step = r + 1
        bb.train(True)
        timed("engine_step", lambda: ctx.update(objective, batch))
        with autocast:
            timed("hand_step", lambda: hand_dgpo_step(model, frozen, ema, opt, batch.latents, ehs, pooled, adv, gids,
                                                      sigmas, noises, o, ctx.group_size, r + 1))

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"threads {torch.get_num_threads()}, bf16 autocast {bb._autocast}, {len(batch)} images per step, "
          f"{args.repeats} repeats (median)")
    for phase in ("rollout", "step"):
        e, h = med[f"engine_{phase}"], med[f"hand_{phase}"]
        print(f"{phase:8s} engine {e:7.3f} s   hand-written {h:7.3f} s   ratio {e / h:.3f}")
    total_e = med["engine_rollout"] + med["engine_step"]
    total_h = med["hand_rollout"] + med["hand_step"]
    print(f"{'total':8s} engine {total_e:7.3f} s   hand-written {total_h:7.3f} s   ratio {total_e / total_h:.3f}")


if __name__ == "__main__":
    main()
