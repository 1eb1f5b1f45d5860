"""Gradient signal-to-noise of an objective at the base weights: do independent steps agree?

    python benchmarks/gradient_snr.py --preset dgpo-nano --group-size 16 --prompts-per-step 8 --estimates 4

Builds the engine as ``dgpo-bench run`` does, then for K optimizer steps' worth of fresh
rollouts (steps 0..K-1: their own prompts, noise and timestep draws) runs the objective's
update through the engine (``EngineContext.update``) with the optimizer step replaced by a
capture of the gradient, so the
weights never move and every estimate is of the same expected gradient. Prints the
pairwise cosines between the K gradients. If an estimate from N images is signal plus
independent noise, the mean cosine is c = |g|^2 / (|g|^2 + s^2 / N), so the images per
step at which two estimates would agree with cosine 1/2 are N (1 - c) / c. A cosine near
zero says the step's gradient is mostly noise at this batch size.

``--line-search 1e-4,3e-4,1e-3`` then moves the weights along the mean of the K gradients
(descent), along its sign (the shape of Adam's first steps: every weight moves by the same
amount) and along a random Gaussian direction, each scaled so that the root-mean-square
change per weight is the given size, and scores one fixed probe rollout (the prompts and
noise of step K, the same for every point) with the training reward: does a step along the
objective's gradient raise the reward, and is the model more fragile along it than along
a random direction?
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch


def build(args: argparse.Namespace):
    from dgpo_bench.engine import Engine
    from dgpo_bench.plugins import get_plugin_manager, load_components
    from dgpo_bench.resolve import build_spec, resolve

    comps = load_components(get_plugin_manager())
    data = {"preset": args.preset, "rewards": [{"name": args.reward}], "seed": args.seed, "eval": {"prompts": 1}}
    if args.group_size:
        data["group_size"] = args.group_size
    if args.prompts_per_step:
        data["prompts_per_step"] = args.prompts_per_step
    spec, notes = build_spec(comps, data, args.option)
    engine = Engine(resolve(comps, spec, notes), run_dir="/tmp/dgpo-bench-gradient-snr", progress=False)
    engine.build()
    return engine


def gradient_estimates(engine, steps: list[int]) -> tuple[list[torch.Tensor], list[float]]:
    """The flattened gradient of the objective's loss at each of ``steps``, from that step's
    rollouts and draws, and the mean rollout reward of each; the weights do not move."""
    ctx, captured = engine.ctx, []

    def capture() -> float:
        grads = [p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel())
                 for p in ctx.params]
        captured.append(torch.cat(grads).cpu())
        ctx.optimizer.zero_grad(set_to_none=True)
        return float(captured[-1].norm())

    ctx._apply_gradients = capture  # the gradient is recorded and dropped: no optimizer step
    rewards = []
    for step in steps:
        ctx.step = step
        (batch,), _ = engine.rollout(step)
        engine.backbone.train(True)
        ctx.update(engine.objective, batch)
        rewards.append(float(batch.rewards.mean()))
    return captured, rewards


def line_search(engine, direction: torch.Tensor, sizes: list[float], probe_step: int) -> list[float]:
    """Mean training reward of the probe rollout at theta - size * sqrt(P) * d / |d| for each size."""
    params = engine.ctx.params
    theta = [p.detach().clone() for p in params]
    unit = direction / direction.norm() * direction.numel() ** 0.5
    scores = []
    engine.ctx.step = 0
    for size in sizes:
        with torch.no_grad():
            offset = 0
            for p, t in zip(params, theta):
                p.copy_(t - size * unit[offset:offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()
        (batch,), _ = engine.rollout(probe_step)
        scores.append(float(batch.rewards.mean()))
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    return scores


def sizes_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1e-4,3e-4") from None


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dgpo-nano")
    ap.add_argument("--reward", default="ocr")
    ap.add_argument("--group-size", type=int, default=0, help="0: the preset's")
    ap.add_argument("--prompts-per-step", type=int, default=0, help="0: the preset's")
    ap.add_argument("--estimates", type=int, default=4, help="independent gradients (K >= 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("-o", "--option", action="append", default=[], help="COMPONENT.KEY=VALUE, as in run")
    ap.add_argument("--line-search", type=sizes_list, default=[], metavar="SIZES",
                    help="comma-separated RMS step sizes per weight, e.g. 1e-4,3e-4,1e-3")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    if args.estimates < 2:
        ap.error("--estimates must be at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    from dgpo_bench.errors import DgpoBenchError

    try:
        engine = build(args)
    except DgpoBenchError as exc:  # unknown preset or component, invalid option: one sentence, exit 2
        ap.error(str(exc))
    t0 = time.perf_counter()
    grads, rewards = gradient_estimates(engine, list(range(args.estimates)))
    seconds = time.perf_counter() - t0
    zero = [i for i, g in enumerate(grads) if not g.any()]  # e.g. every group's rewards tied: no signal
    if len(grads) - len(zero) < 2:
        ap.error(f"{len(zero)} of {len(grads)} gradients are zero (every group's rewards tied); "
                 "raise --group-size or --estimates.")
    cosines = [cosine(a, b) for a, b in itertools.combinations([g for i, g in enumerate(grads) if i not in zero], 2)]
    c = statistics.mean(cosines)
    n = engine.spec.images_per_step
    out = {
        "preset": args.preset, "objective": engine.spec.objective.name, "images_per_step": n,
        "estimates": args.estimates, "rollout_reward": statistics.mean(rewards),
        "grad_norms": [float(g.norm()) for g in grads], "zero_gradients": len(zero), "cosines": cosines, "mean_cosine": c,
        "images_for_cosine_half": n * (1 - c) / c if c > 0 else None, "seconds": seconds,
        "parameters": int(grads[0].numel()),
    }
    if args.line_search:
        sizes = [0.0, *args.line_search]
        mean_grad = torch.stack(grads).mean(0)
        gen = torch.Generator().manual_seed(args.seed)
        out["line_search"] = {
            "sizes": sizes,
            "mean_gradient": line_search(engine, mean_grad, sizes, args.estimates),
            "mean_gradient_sign": line_search(engine, mean_grad.sign(), sizes, args.estimates),
            "random": line_search(engine, torch.randn(mean_grad.shape, generator=gen), sizes, args.estimates)}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['objective']} ({args.preset}), {n} images per step, {args.estimates} estimates in {seconds:.0f} s")
    print(f"  rollout reward {out['rollout_reward']:.3f}; gradient norms "
          + ", ".join(f"{g:.3g}" for g in out["grad_norms"]))
    print(f"  pairwise cosines {', '.join(f'{x:+.3f}' for x in cosines)}; mean {c:+.3f}")
    if c > 0:
        print(f"  two estimates would agree with cosine 0.5 at about {out['images_for_cosine_half']:.0f} images per step")
    else:
        print("  no agreement between estimates at this batch size")
    if "line_search" in out:
        ls = out["line_search"]
        print(f"  probe reward (step {args.estimates}'s rollout) after a step of RMS size per weight:")
        for name in ("mean_gradient", "mean_gradient_sign", "random"):
            print(f"    {name:19s}" + "  ".join(f"{s:g}: {r:.3f}" for s, r in zip(ls["sizes"], ls[name])))


if __name__ == "__main__":
    main()
