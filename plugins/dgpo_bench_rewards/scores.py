"""Checks every reward applies to its inputs and outputs, so a failure never hides."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dgpo_bench.contracts import Prompt
from dgpo_bench.errors import RewardError


def checked_images(name: str, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
    """The batch as a uint8 (B, H, W, 3) array with one prompt per image, or RewardError."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise RewardError(f"Reward '{name}' needs uint8 images of shape (B, H, W, 3), "
                          f"got {images.dtype} {images.shape}; decode latents with the backbone first.")
    if len(prompts) != len(images):
        raise RewardError(f"Reward '{name}' got {len(images)} images but {len(prompts)} prompts; "
                          "pass one prompt per image.")
    return images


def checked_scores(name: str, values: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """``values`` as float64 (n,), or RewardError when a score is missing or not finite."""
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if scores.shape != (n,):
        raise RewardError(f"Reward '{name}' returned {scores.size} scores for {n} images; "
                          "this is a bug in the reward plugin.")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise RewardError(f"Reward '{name}' produced a non-finite score ({scores[bad[0]]}) for image "
                          f"{int(bad[0])}; check the reward model's weights and inputs.")
    return scores
