"""``aesthetic``: the LAION aesthetic predictor v2 (an MLP on CLIP ViT-L/14 image embeddings)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import Field

from dgpo_bench.contracts import LoadContext, Options, Prompt, Reward
from dgpo_bench.errors import MissingWeightsError

from .clip_models import ClipEmbedder, weights_dir
from .scores import checked_images, checked_scores

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(torch.nn.Module):
    """The predictor's MLP, with the layer names of its released state dict (``layers.N``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(path: Path) -> AestheticHead:
    """Read the head from the released ``.pth`` state dict (weights only) or a ``.safetensors`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        head = AestheticHead(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
    except (OSError, KeyError, RuntimeError) as exc:
        raise MissingWeightsError(f"{path} is not the LAION aesthetic head ({type(exc).__name__}: {exc}); "
                                  f"download {HEAD_FILE} from LAION-AI/aesthetic-predictor.") from exc
    return head.eval().requires_grad_(False)


class AestheticOptions(Options):
    path: str | None = None
    """Folder of CLIP ViT-L/14 (openai/clip-vit-large-patch14) (default: $DGPO_BENCH_AESTHETIC_PATH)."""
    head: str | None = None
    """The MLP weights file (default: $DGPO_BENCH_AESTHETIC_HEAD, else ``path``/sac+logos+ava1-l14-linearMSE.pth)."""
    batch_size: int = Field(16, ge=1)


class AestheticReward(Reward):
    """LAION aesthetic score (about 1-10) of the image alone; the prompt is not used."""

    name = "aesthetic"
    Options = AestheticOptions

    def load(self, ctx: LoadContext) -> None:
        o = self.options
        clip_dir = weights_dir(o.path, "DGPO_BENCH_AESTHETIC_PATH", what="Aesthetic-predictor CLIP",
                               needs="openai/clip-vit-large-patch14", option=f"{self.name}.path")
        head = Path(o.head or os.environ.get("DGPO_BENCH_AESTHETIC_HEAD") or clip_dir / HEAD_FILE).expanduser()
        if not head.is_file():
            raise MissingWeightsError(f"The aesthetic head weights are missing at {head}: download {HEAD_FILE} "
                                      f"from LAION-AI/aesthetic-predictor and pass -o {self.name}.head=FILE or "
                                      "set DGPO_BENCH_AESTHETIC_HEAD=FILE.")
        self.clip = ClipEmbedder(clip_dir, clip_dir, ctx.device, o.batch_size)
        self.head = load_head(head).to(ctx.device)

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        images = checked_images(self.name, images, prompts)
        values = self.head(self.clip.images(images)).squeeze(-1)
        return checked_scores(self.name, values.cpu().numpy(), len(images))
