"""Evaluate pretraining checkpoints and ship one as the packaged nano weights.

    # score candidate checkpoints on held-out prompts (default eval settings of config.json)
    python -m dgpo_bench_backbones.nano.export eval runs/pretrain/text_s0/ckpt_003500 --n 512
    # copy one (EMA weights + config) to weights/<world>/ with samples.png and eval.json
    python -m dgpo_bench_backbones.nano.export ship runs/pretrain/text_s0/ckpt_003500 --n 512
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .model import default_weights_dir, load_nano
from .pretrain import Scorer, evaluate, grid


def ceiling(world: str, n: int = 512, seed: int = 0) -> dict:
    """Score of ground-truth renders of the held-out prompts (reward ceiling)."""
    from dgpo_bench_tasks import load_prompts

    items = load_prompts(world, "eval")[:n]
    rng = np.random.default_rng(seed)
    if world == "text":
        from dgpo_bench_tasks.text import render_text

        imgs = np.stack([render_text(it["metadata"]["target"], rng) for it in items])
    else:
        from dgpo_bench_tasks.shapes import render_scene

        imgs = np.stack([render_scene(it["metadata"]["scene"], rng, train_only_colors=False) for it in items])
    res = Scorer(world)(imgs, [it["metadata"] for it in items])
    return {"score": res["score"], "exact": res["exact"], "n": len(items)}


def eval_ckpt(path: str | Path, n: int = 512, seed: int = 1000, threads: int = 2, autocast: bool = False,
              guidance_scale: float | None = None, return_images: bool = False) -> dict:
    torch.set_num_threads(threads)
    model = load_nano(path)
    world = model.config.world
    t = time.time()
    res = evaluate(model, world, n=n, seed=seed, autocast=autocast, scorer=Scorer(world, threads),
                   guidance_scale=guidance_scale, return_images=return_images)
    res["seconds"] = time.time() - t
    res["guidance_scale"] = model.config.guidance_scale if guidance_scale is None else guidance_scale
    res["num_steps"] = model.config.num_inference_steps
    res["checkpoint"] = str(path)
    return res


def ship(path: str | Path, n: int = 512, threads: int = 2) -> Path:
    path = Path(path)
    model = load_nano(path)
    world = model.config.world
    dst = default_weights_dir(world)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(path / "model.safetensors", dst / "model.safetensors")
    shutil.copy(path / "config.json", dst / "config.json")
    res = eval_ckpt(dst, n=n, threads=threads, return_images=True)
    from PIL import Image

    Image.fromarray(grid(res["images"][:16], 2 if world == "text" else 4)).save(dst / "samples.png")
    summary = {k: res[k] for k in ("score", "exact", "n", "guidance_scale", "num_steps", "seconds")}
    summary["source_checkpoint"] = str(path)
    summary["ceiling"] = ceiling(world, n=n)
    summary["sample_prompts"] = res["prompts"][:16]
    (dst / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["eval", "ship", "ceiling"])
    ap.add_argument("paths", nargs="+", help="checkpoint dirs (or a world name for 'ceiling')")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance-scale", type=float, default=None)
    a = ap.parse_args(argv)
    for p in a.paths:
        if a.cmd == "eval":
            r = eval_ckpt(p, n=a.n, seed=a.seed, threads=a.threads, guidance_scale=a.guidance_scale)
            r.pop("texts", None), r.pop("scores", None)
            print(json.dumps(r), flush=True)
        elif a.cmd == "ceiling":
            print(json.dumps({"world": p, **ceiling(p, n=a.n)}), flush=True)
        else:
            ship(p, n=a.n, threads=a.threads)


if __name__ == "__main__":
    main()
