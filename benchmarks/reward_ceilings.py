"""Ceilings of the shipped rewards: their scores on ground-truth images of their own prompts.

    .venv/bin/python benchmarks/reward_ceilings.py [--write benchmarks/results/reward_ceilings.md]

A reward whose ceiling is below 1 would cap what any objective can show, so these numbers
bound every comparison made with it. OCR: the text world's prompts rendered as the nano
world renders them (32x128, random size, position and colours; recognition only) and as
large scenes (512x512, detection + recognition). Compositional: each scene drawn by the
world's renderer, scored by the checker (partial credit and GenEval's strict correctness).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from dgpo_bench.contracts import LoadContext
from dgpo_bench_rewards.compositional import CompositionalReward
from dgpo_bench_rewards.ocr import OcrReward, ocr_target
from dgpo_bench_tasks.text import exact_match, ocr_similarity, render_text
from dgpo_bench_tasks.shapes import render_scene


def ocr_rows(large: int) -> list[str]:
    reward = OcrReward()
    reward.load(LoadContext(device=torch.device("cpu")))
    rows = []
    try:
        for split in ("eval", "train"):
            prompts = reward.prompts(split)[:1024]
            rng = np.random.default_rng(0)
            images = np.stack([render_text(p.metadata["target"], rng) for p in prompts])
            texts = reward.read(images)
            scores = [ocr_similarity(t, ocr_target(p)) for t, p in zip(texts, prompts)]
            ok = [exact_match(t, p.metadata["target"]) for t, p in zip(texts, prompts)]
            missed = sorted({f"{p.metadata['target']!r} read {t!r}" for t, p, o in zip(texts, prompts, ok) if not o})
            rows.append(f"| ocr | text {split}, 32x128 renders (rec) | {len(prompts)} | {np.mean(scores):.4f} | "
                        f"{np.mean(ok):.4f} | min {np.min(scores):.3f}; misread: {'; '.join(missed[:4]) or 'none'} |")
            print(rows[-1], flush=True)
        prompts = reward.prompts("eval")[:large]
        rng = np.random.default_rng(1)
        images = np.stack([render_text(p.metadata["target"], rng, 512, 512, font_size=int(rng.integers(16, 65)))
                           for p in prompts])
        texts = reward.read(images)
        scores = np.array([ocr_similarity(t, ocr_target(p)) for t, p in zip(texts, prompts)])
        exact = np.mean([exact_match(t, p.metadata["target"]) for t, p in zip(texts, prompts)])
        rows.append(f"| ocr | text eval, 512x512 renders, font 16-64 px (det-rec) | {len(prompts)} | "
                    f"{scores.mean():.4f} | {exact:.4f} | min {scores.min():.3f} |")
        print(rows[-1], flush=True)
    finally:
        reward.close()
    return rows


def checker_rows() -> list[str]:
    reward, strict = CompositionalReward(), CompositionalReward({"strict": True})
    rows = []
    for split in ("eval", "train"):
        prompts = reward.prompts(split)
        rng = np.random.default_rng(0)
        images = np.stack([render_scene(p.metadata["scene"], rng) for p in prompts])
        partial, binary = reward.score(images, prompts), strict.score(images, prompts)
        by_cat = collections.defaultdict(list)
        for p, b in zip(prompts, binary):
            by_cat[p.metadata["scene"]["category"]].append(b)
        worst = min(by_cat, key=lambda c: np.mean(by_cat[c]))
        rows.append(f"| compositional | shapes {split}, 64x64 scenes | {len(prompts)} | {partial.mean():.4f} | "
                    f"{binary.mean():.4f} | lowest category {worst} {np.mean(by_cat[worst]):.3f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=64, help="number of 512x512 OCR images")
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    rows = checker_rows() + ocr_rows(args.large)
    text = "\n".join([
        "# Reward ceilings (scores of ground-truth images)",
        "",
        "Reproduce: `.venv/bin/python benchmarks/reward_ceilings.py --write benchmarks/results/reward_ceilings.md`.",
        "Exact = recognised text equals the target after lower-casing and removing spaces (OCR), or every",
        "requirement met (GenEval's binary correctness, compositional).",
        "",
        "| reward | images | n | mean score | exact | note |",
        "|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
