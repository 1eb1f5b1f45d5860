"""``clip-score``: image-prompt agreement, 100 * max(cosine, 0) of CLIP embeddings (Hessel et al. 2021)."""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
from pydantic import Field

from dgpo_bench.contracts import LoadContext, Options, Prompt, Reward

from .clip_models import ClipEmbedder, weights_dir
from .scores import checked_images, checked_scores


class ClipScoreOptions(Options):
    path: str | None = None
    """Folder of a CLIP model with its processor, e.g. openai/clip-vit-large-patch14 (default: $DGPO_BENCH_CLIP_PATH)."""
    batch_size: int = Field(16, ge=1)


class ClipScoreReward(Reward):
    """CLIPScore: 100 times the clipped cosine similarity of image and prompt embeddings."""

    name = "clip-score"
    Options = ClipScoreOptions
    score_range: ClassVar[tuple[float, float]] = (0.0, 100.0)

    def load(self, ctx: LoadContext) -> None:
        model_dir = weights_dir(self.options.path, "DGPO_BENCH_CLIP_PATH", what="CLIPScore",
                                needs="a CLIP model such as openai/clip-vit-large-patch14",
                                option=f"{self.name}.path")
        self.clip = ClipEmbedder(model_dir, model_dir, ctx.device, self.options.batch_size)

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        images = checked_images(self.name, images, prompts)
        cos = (self.clip.images(images) * self.clip.texts([p.text for p in prompts])).sum(-1)
        return checked_scores(self.name, (100.0 * cos.clamp(min=0)).cpu().numpy(), len(images))
