"""How much room a group-relative objective has: the spread of a model's own samples per prompt.

    python benchmarks/group_headroom.py --reward ocr --samples 16
    python benchmarks/group_headroom.py runs/preset_z3_s0 --samples 16 --json

Group objectives (DGPO, Flow-GRPO) learn only from differences between the samples of one
prompt. This draws ``--samples`` images per held-out prompt with the evaluation sampler,
as ``dgpo-bench eval`` does (evaluation seeds 0..N-1, so seed 0 is the held-out score's
own noise), and prints:

- the mean score (the held-out score, averaged over N seeds);
- best-of-N: the mean over prompts of the best sample, what a policy that always drew its
  own best of N would score;
- the top-quarter mean: what a policy that always drew from its own upper quarter would score;
- the share of the score variance that lies within prompts (the part a group advantage sees;
  the rest is prompt-to-prompt difficulty, which it subtracts away);
- the share of prompts whose N samples all score the same (no signal at all).

Run it on the base and on a tuned run to see whether fine-tuning moved the mean towards the
base's upper samples or narrowed the groups.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def sample_scores(args: argparse.Namespace) -> tuple[str, np.ndarray]:
    """(reward name, scores of shape [samples, prompts])."""
    from dgpo_bench.evaluation import evaluate
    from dgpo_bench.plugins import get_plugin_manager, load_components
    from dgpo_bench.runtime import build_for_eval

    comps = load_components(get_plugin_manager())
    reward = args.reward or (None if args.run else "ocr")  # a run's own reward by default
    session = build_for_eval(comps, args.run, None, [{"name": reward}] if reward else [], None, args.prompts,
                             args.option)
    name = next(iter(session.rewards))
    rows = []
    with session.progress:
        for seed in range(args.samples):
            res = evaluate(session.backbone, session.sampler, session.rewards, session.prompts, [seed], 64,
                           session.accelerator, session.progress, label=f"seed {seed}")
            rows.append(res.per_prompt[name])
    return name, np.asarray(rows)


def headroom(scores: np.ndarray) -> dict[str, float]:
    """Summary of a [samples, prompts] score matrix."""
    n = scores.shape[0]
    ranked = np.sort(scores, axis=0)[::-1]
    total = scores.var()
    return {
        "mean": float(scores.mean()),
        "best_of_n": float(ranked[0].mean()),
        "top_quarter_mean": float(ranked[: max(1, n // 4)].mean()),
        "within_prompt_variance_share": float(scores.var(axis=0).mean() / total) if total > 0 else 0.0,
        "within_prompt_std": float(scores.std(axis=0).mean()),
        "tied_prompt_share": float((scores.max(axis=0) == scores.min(axis=0)).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", type=Path, help="a run directory whose trained weights to sample (default: the base)")
    ap.add_argument("--reward", help="reward to score (default: the run's first, else ocr)")
    ap.add_argument("--samples", type=int, default=16, help="images per prompt, N (default 16, the nano group size)")
    ap.add_argument("--prompts", type=int, help="held-out prompts (default: the run's own, else 256)")
    ap.add_argument("-o", "--option", action="append", default=[], help="COMPONENT.KEY=VALUE, as in eval")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON line, with the score matrix")
    args = ap.parse_args(argv)
    if args.samples < 2:
        ap.error("--samples must be at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    from dgpo_bench.errors import DgpoBenchError

    try:
        name, scores = sample_scores(args)
    except DgpoBenchError as exc:  # not a run directory, unknown reward, invalid option
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = {"run": str(args.run) if args.run else "base", "reward": name, "samples": args.samples,
           "prompts": scores.shape[1], **headroom(scores)}
    if args.json:
        print(json.dumps({**out, "scores": scores.tolist()}))
        return 0
    print(f"{out['run']}: {name}, {out['prompts']} held-out prompts x {args.samples} samples")
    print(f"  mean {out['mean']:.3f}; best of {args.samples} {out['best_of_n']:.3f}; "
          f"top-quarter mean {out['top_quarter_mean']:.3f}")
    print(f"  within-prompt std {out['within_prompt_std']:.3f}; share of variance within prompts "
          f"{out['within_prompt_variance_share']:.2f}; prompts with all samples tied {out['tied_prompt_share']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
