"""Reward scoring with failure checks, and the engine-owned evaluation protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .context import derive_seed
from .contracts import Backbone, Prompt, Reward, SampleNoise, Sampler
from .errors import DgpoBenchError, RewardError
from .progress import ProgressReporter


def score_reward(name: str, reward: Reward, images: np.ndarray, prompts: Sequence[Prompt],
                 group_size: int | None = None) -> np.ndarray:
    """Scores of one reward, one float per image; refuses failures and non-finite values.

    A group-wise reward is called once per complete group of ``group_size``.
    """
    try:
        if reward.groupwise and group_size:
            parts = [reward.score(images[i:i + group_size], prompts[i:i + group_size])
                     for i in range(0, len(prompts), group_size)]
            scores = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts])
        else:
            scores = np.asarray(reward.score(images, prompts), dtype=np.float64).reshape(-1)
    except DgpoBenchError:
        raise
    except Exception as exc:
        raise RewardError(
            f"Reward '{name}' failed on a batch of {len(prompts)} images ({type(exc).__name__}: {exc}); "
            "check its installation or options, or rerun with --debug for the traceback."
        ) from exc
    if scores.shape != (len(prompts),):
        raise RewardError(f"Reward '{name}' returned {scores.shape[0]} scores for {len(prompts)} images; "
                          "a reward must return one score per image.")
    if not np.isfinite(scores).all():
        raise RewardError(f"Reward '{name}' returned non-finite scores ({int((~np.isfinite(scores)).sum())} "
                          f"of {len(scores)}); fix the reward, dgpo-bench will not train on them.")
    return scores


@dataclass
class EvalResult:
    scores: dict[str, float]
    per_prompt: dict[str, list[float]]
    """Mean over evaluation seeds, per prompt, in prompt order."""
    grid: np.ndarray | None
    grid_prompts: list[str]


def eval_noise(backbone: Backbone, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Initial noise of held-out prompt ``indices`` under evaluation seed ``seed``.

    It depends only on (seed, prompt index), so the base model and every method
    are evaluated, and drawn in grids, from the same noise.
    """
    noise = SampleNoise([derive_seed("eval", seed, int(i)) for i in indices], device=backbone.device)
    return noise.randn(backbone.latent_shape, dtype=backbone.dtype)


@torch.no_grad()
def evaluate(backbone: Backbone, sampler: Sampler, rewards: dict[str, Reward], prompts: Sequence[Prompt],
             seeds: Sequence[int], batch_size: int, accelerator, progress: ProgressReporter | None = None,
             grid: int = 0, label: str = "eval") -> EvalResult:
    """Score every reward on ``prompts`` x ``seeds`` with ``sampler``; split across processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(prompts), world))
    scores = {name: np.zeros((len(seeds), len(prompts))) for name in rewards}
    grid_images: list[np.ndarray] = []
    task = progress.task(label, len(mine) * len(seeds)) if progress else None
    backbone.train(False)
    starts: list[int | None] = list(range(0, len(mine), batch_size))
    if getattr(accelerator, "is_fsdp2", False):
        # sharded weights are gathered at every forward: as many batches as the process with the most prompts
        most = -(-len(prompts) // world)
        starts += [None] * (-(-most // batch_size) - len(starts))
    with backbone.meter.phase("eval"):
        for s_i, seed in enumerate(seeds):
            for start in starts:
                if start is None:  # a forward to keep in step, scored by nobody
                    sampler.sample(backbone, backbone.encode_prompts([prompts[0].text]), eval_noise(backbone, seed, [0]))
                    continue
                idx = mine[start:start + batch_size]
                batch_prompts = [prompts[i] for i in idx]
                cond = backbone.encode_prompts([p.text for p in batch_prompts])
                out = sampler.sample(backbone, cond, eval_noise(backbone, seed, idx))
                images = backbone.decode(out.latents)
                if s_i == 0:
                    grid_images += [images[j] for j, i in enumerate(idx) if i < grid]
                for name, reward in rewards.items():
                    scores[name][s_i, idx] = score_reward(name, reward, images, batch_prompts)
                if progress:
                    progress.advance(task, len(idx))
    if progress:
        progress.finish(task)
    if world > 1:
        for name in scores:
            t = torch.as_tensor(scores[name], device=accelerator.device)
            scores[name] = accelerator.reduce(t, reduction="sum").cpu().numpy()
    per_prompt = {name: s.mean(axis=0).tolist() for name, s in scores.items()}
    n_grid = min(grid, len(prompts))
    grid_arr = np.stack(grid_images[:n_grid]) if grid_images and world == 1 else None
    return EvalResult({name: float(s.mean()) for name, s in scores.items()}, per_prompt, grid_arr,
                      [p.text for p in prompts[:n_grid]])
