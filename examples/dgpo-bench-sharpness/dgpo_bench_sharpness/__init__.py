"""A dgpo-bench reward plugin: image sharpness as the variance of the Laplacian."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import Field

import dgpo_bench
from dgpo_bench.contracts import Options, Prompt, Reward


class SharpnessOptions(Options):
    scale: float = Field(100.0, gt=0, description="Laplacian variance that maps to a score of 0.5.")


class Sharpness(Reward):
    """Sharpness: variance of the Laplacian of the grey image, squashed to [0, 1)."""

    name = "sharpness"
    Options = SharpnessOptions
    higher_is_better = True
    score_range = (0.0, 1.0)

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        grey = images.astype(np.float64).mean(axis=-1)
        lap = (grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
               - 4 * grey[:, 1:-1, 1:-1])
        var = lap.reshape(len(images), -1).var(axis=1)
        return var / (var + self.options.scale)


@dgpo_bench.hookimpl
def register_rewards(register):
    register(Sharpness)
