"""Paired per-prompt gain of finished runs over their base model, with bootstrap intervals.

    python benchmarks/paired_gain.py runs/a runs/b runs/c --reward ocr --by quote-length

A run's held-out score is a mean over prompts, and the base model was scored on the same
prompts with the same noise, so the gain is best read prompt by prompt. For each run this
reads ``per_prompt.json`` (the base and final score of every held-out prompt; with
``--step N`` the scores of the evaluation at step N from ``metrics.jsonl``) and prints
the base and tuned means, the gain with a 95% percentile-bootstrap interval over prompts,
and how many prompts went up and down. With several runs on the same prompts (seeds of one
method) it also pools them: the per-prompt gain averaged over runs, with its interval over
prompts, and the seed-to-seed spread of the run gains. ``--by quote-length`` splits the
pooled gain by the length of the quoted text in each prompt (the OCR world's target).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from dgpo_bench.errors import SpecError
from dgpo_bench.results import METRICS_FILE, read_jsonl


def load(run_dir: Path, reward: str | None, step: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Prompts, base and tuned per-prompt scores of one run for ``reward`` (default: the first).

    The tuned scores are the final evaluation's, or with ``step`` those of the evaluation
    made at that step (from ``metrics.jsonl``; the run need not have finished)."""
    path = run_dir / "per_prompt.json"
    if not path.is_file():
        raise SpecError(f"{run_dir} has no per_prompt.json; pass the directory of a run past its base evaluation.")
    data = json.loads(path.read_text())
    if "base" not in data:
        raise SpecError(f"{path} has no base scores (written before they were kept); rerun that run.")
    if step is None:
        if "final" not in data:
            raise SpecError(f"{run_dir} has not finished; pass --step with the step of one of its evaluations.")
        tuned = data["final"]
    else:
        metrics = run_dir / METRICS_FILE
        if not metrics.is_file():
            raise SpecError(f"{run_dir} has no {METRICS_FILE}; pass a run directory.")
        evals = [r for r in read_jsonl(metrics)
                 if r.get("type") == "eval" and r.get("label") != "base" and "per_prompt" in r]
        at_step = [r["per_prompt"] for r in evals if r["step"] == step]
        if not at_step:
            steps = ", ".join(str(n) for n in sorted({r["step"] for r in evals})) or "none"
            raise SpecError(f"{run_dir} has no per-prompt evaluation at step {step}; it has steps {steps}.")
        tuned = at_step[-1]
    name = reward or next(iter(tuned))
    if name not in tuned or name not in data["base"]:
        raise SpecError(f"{run_dir} has no scores for reward {name!r}; it has {', '.join(tuned)}.")
    return data["prompts"], np.asarray(data["base"][name]), np.asarray(tuned[name])


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def quote_length(prompt: str) -> int | None:
    found = re.search(r'"([^"]*)"', prompt)
    return len(found.group(1)) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (finished, or past the evaluation that --step names)")
    parser.add_argument("--reward", help="reward to read (default: the first in per_prompt.json)")
    parser.add_argument("--step", type=int, help="pair the evaluation at this step, not the final one")
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--by", choices=["quote-length"], help="split the pooled gain by prompt group")
    args = parser.parse_args(argv)
    try:
        loaded = [load(run, args.reward, args.step) for run in args.runs]
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print("| run | prompts | base | tuned | gain | 95% CI over prompts | up / down |")
    print("|---|---:|---:|---:|---:|---|---:|")
    diffs = [final - base for _, base, final in loaded]  # runs may differ in prompt count
    for run, (prompts, base, final), diff in zip(args.runs, loaded, diffs):
        lo, hi = bootstrap_ci(diff, args.resamples, args.seed)
        print(f"| {run} | {len(prompts)} | {base.mean():.3f} | {final.mean():.3f} | {diff.mean():+.3f} "
              f"| [{lo:+.3f}, {hi:+.3f}] | {(diff > 0).sum()} / {(diff < 0).sum()} |")

    prompts = loaded[0][0]
    if len(loaded) < 2 and args.by is None:
        return 0
    if any(p != prompts for p, *_ in loaded):
        print("\nThe runs were scored on different prompts; not pooled.")
        return 0
    pooled = np.mean(diffs, axis=0)
    lo, hi = bootstrap_ci(pooled, args.resamples, args.seed)
    spread = f" ± {statistics.stdev(float(d.mean()) for d in diffs):.3f} (std over runs)" if len(loaded) > 1 else ""
    print(f"\npooled over {len(loaded)} run(s): gain {pooled.mean():+.3f}{spread}; "
          f"95% CI over prompts [{lo:+.3f}, {hi:+.3f}]")
    if args.by == "quote-length":
        lengths = [quote_length(p) for p in prompts]
        if any(n is None for n in lengths):
            print("\nSome prompts have no quoted text; --by quote-length needs the OCR world's prompts.")
            return 0
        base_all = np.mean([base for _, base, _ in loaded], axis=0)
        print("\n| quoted characters | prompts | base | gain | 95% CI |\n|---:|---:|---:|---:|---|")
        for n in sorted(set(lengths)):
            idx = np.array([length == n for length in lengths])
            lo, hi = bootstrap_ci(pooled[idx], args.resamples, args.seed)
            print(f"| {n} | {idx.sum()} | {base_all[idx].mean():.3f} | {pooled[idx].mean():+.3f} "
                  f"| [{lo:+.3f}, {hi:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
