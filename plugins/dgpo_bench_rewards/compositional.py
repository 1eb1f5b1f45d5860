"""``compositional``: GenEval-style scoring of the synthetic shapes world by an exact checker."""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from dgpo_bench.contracts import Options, Prompt, Reward
from dgpo_bench.errors import RewardError

from .prompt_sets import world_prompts
from .scores import checked_images, checked_scores


class CompositionalOptions(Options):
    strict: bool = False
    """Score 1 only when every requirement holds (GenEval's binary correctness) instead of
    the fraction of requirements met (GenEval's partial credit, the training reward)."""


class CompositionalReward(Reward):
    """Fraction of the prompt's objects, counts, colours and positions found by colour segmentation."""

    name = "compositional"
    world = "shapes"
    Options = CompositionalOptions
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        from dgpo_bench_tasks import shapes

        images = checked_images(self.name, images, prompts)
        check = shapes.check_scene_strict if self.options.strict else shapes.check_scene
        scores = []
        for image, prompt in zip(images, prompts):
            scene = prompt.metadata.get("scene")
            if not isinstance(scene, dict):
                raise RewardError(f"Prompt {prompt.text!r} has no 'scene' metadata; the compositional reward "
                                  "scores shapes-world prompts (see its prompts('train'/'eval')).")
            try:
                scores.append(check(image, scene))
            except (KeyError, ValueError, TypeError) as exc:
                raise RewardError(f"The scene of prompt {prompt.text!r} is malformed ({type(exc).__name__}: "
                                  f"{exc}); regenerate it with dgpo_bench_tasks.shapes.") from exc
        return checked_scores(self.name, scores, len(images))

    def prompts(self, split: str) -> list[Prompt]:
        return world_prompts(self.world, split)
