"""``pickscore`` (human-preference CLIP, Kirstain et al. 2023) and its group-wise rank form ``pickscore-rank``."""

from __future__ import annotations

import os
from typing import ClassVar, Sequence

import numpy as np
from pydantic import Field

from dgpo_bench.contracts import LoadContext, Options, Prompt, Reward

from .clip_models import ClipEmbedder, weights_dir
from .scores import checked_images, checked_scores

NEEDS = ("the PickScore model (yuvalkirstain/PickScore_v1) with the tokenizer and image processor "
         "of laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


class PickScoreOptions(Options):
    path: str | None = None
    """Folder of the PickScore CLIP model (default: $DGPO_BENCH_PICKSCORE_PATH)."""
    processor_path: str | None = None
    """Folder of its tokenizer and image processor (default: $DGPO_BENCH_PICKSCORE_PROCESSOR_PATH, else ``path``)."""
    batch_size: int = Field(16, ge=1)


class PickScoreReward(Reward):
    """PickScore: CLIP logit scale times the cosine of image and prompt embeddings (about 17-25)."""

    name = "pickscore"
    Options = PickScoreOptions

    def load(self, ctx: LoadContext) -> None:
        o = self.options
        model_dir = weights_dir(o.path, "DGPO_BENCH_PICKSCORE_PATH", what="PickScore", needs=NEEDS,
                                option=f"{self.name}.path")
        processor = o.processor_path or os.environ.get("DGPO_BENCH_PICKSCORE_PROCESSOR_PATH")
        self.clip = ClipEmbedder(model_dir, processor or model_dir, ctx.device, o.batch_size)

    def raw_scores(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        images = checked_images(self.name, images, prompts)
        image_feats = self.clip.images(images)
        text_feats = self.clip.texts([p.text for p in prompts])
        cos = (image_feats * text_feats).sum(-1)
        return checked_scores(self.name, (self.clip.logit_scale * cos).cpu().numpy(), len(images))

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        return self.raw_scores(images, prompts)


def group_ranks(values: np.ndarray, tie: float = 1e-4) -> np.ndarray:
    """Rank of each value within the group scaled to [0, 1] (lowest 0, highest 1).

    Values closer than ``tie`` are equal (the same image scored twice differs by float
    rounding in a batch) and share their mean rank.
    """
    n = len(values)
    if n == 1:
        return np.full(1, 0.5)
    diff = values[None, :] - values[:, None]  # diff[i, j] = v_j - v_i
    less = (diff < -tie).sum(1)
    equal = (np.abs(diff) <= tie).sum(1)
    return (less + (equal - 1) / 2) / (n - 1)


class PickScoreRankReward(PickScoreReward):
    """PickScore rank within each group of samples of one prompt, in [0, 1] (group-wise)."""

    name = "pickscore-rank"
    groupwise = True
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        return checked_scores(self.name, group_ranks(self.raw_scores(images, prompts)), len(images))
