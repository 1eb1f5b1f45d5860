"""One-step denoising quality of nano weights by noise level, scored by the world's reward.

    python benchmarks/nano_denoise.py --world shapes                      # the shipped shapes weights
    python benchmarks/nano_denoise.py --world shapes --weights runs/pretrain/shapes_shift3/ckpt_000750 --grid x0.png

Renders the ground truth of the first ``--n`` held-out prompts, noises it to each sigma
(rectified flow, one noise draw), predicts ``x0 = x_t - sigma v`` in one prompt-conditioned
step and prints the prediction's MSE and its reward score (OCR similarity or the
compositional checker). A sampler commits to what these predictions show at high sigma, so a
model whose high-noise predictions score near 0 draws no layout the reward can find.
``--grid`` saves the ground truth and each sigma's predictions of the first 8 prompts, one row each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dgpo_bench_backbones.nano.export import ground_truth
from dgpo_bench_backbones.nano.model import default_weights_dir, load_nano, to_uint8
from dgpo_bench_backbones.nano.pretrain import Scorer, grid, to_tensor
from dgpo_bench_tasks import load_prompts


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=["text", "shapes"], required=True)
    ap.add_argument("--weights", help="nano weights folder (default: the shipped weights of --world)")
    ap.add_argument("--sigmas", default="0.3,0.6,0.8,0.9,0.95,0.98")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=["varied", "simple"],
                    help="layout of the renders (default: simple, the shipped recipes' for both worlds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", help="save a PNG of the ground truth and the predictions here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    folder = Path(a.weights) if a.weights else default_weights_dir(a.world)
    if not (folder / "config.json").is_file():
        ap.error(f"{folder} is not a nano weights folder (no config.json); pass a ckpt_* or weights folder")
    model = load_nano(folder)
    if model.config.world != a.world:
        ap.error(f"{a.weights} holds {model.config.world}-world weights; pass --world {model.config.world}")
    items = load_prompts(a.world, "eval")[: a.n]
    metas = [it["metadata"] for it in items]
    gt = ground_truth(a.world, items, a.seed, a.layout or "simple")
    x0 = to_tensor(gt)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(a.seed))
    scorer = Scorer(a.world, a.threads)
    ehs, pooled = model.encode([it["prompt"] for it in items])
    rows = [gt[:8]]
    print(f"ground truth: {a.world} reward {scorer(gt, metas)['score']:.3f} ({len(items)} held-out prompts)")
    print("| sigma | MSE of predicted x0 | reward of predicted x0 |\n|---|---:|---:|")
    for sigma in (float(s) for s in a.sigmas.split(",")):
        xt = (1 - sigma) * x0 + sigma * eps
        pred = (xt - sigma * model(xt, torch.full((len(items),), sigma), ehs, pooled)).clamp(-1, 1)
        images = to_uint8(pred)
        print(f"| {sigma:g} | {((pred - x0) ** 2).mean().item():.4f} | {scorer(images, metas)['score']:.3f} |", flush=True)
        rows.append(images[:8])
    if a.grid:
        from PIL import Image

        Image.fromarray(grid(np.concatenate(rows), 8)).save(a.grid)


if __name__ == "__main__":
    main()
