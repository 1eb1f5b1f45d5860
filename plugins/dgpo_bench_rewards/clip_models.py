"""CLIP models from local folders (transformers): weight lookup, embeddings, missing-weight errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dgpo_bench.errors import MissingWeightsError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def weights_dir(value: str | None, env: str, *, what: str, needs: str, option: str) -> Path:
    """The folder from the option, else from ``env``, holding a transformers CLIP model.

    Raises MissingWeightsError naming what is needed and both ways to give it.
    """
    raw = value or os.environ.get(env)
    path = Path(raw).expanduser() if raw else None
    ok = path is not None and (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)
    if not ok:
        where = f" at {path}" if path is not None else ""
        raise MissingWeightsError(
            f"{what} weights are missing{where}: save {needs} (config.json and model weights in transformers "
            f"format) to a folder and pass -o {option}=FOLDER or set {env}=FOLDER."
        )
    return path


class ClipEmbedder:
    """Unit-norm CLIP image and text embeddings, batched, with the text ones cached."""

    def __init__(self, model_dir: Path, processor_dir: Path, device: torch.device, batch_size: int = 16):
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        self.device, self.batch_size = device, batch_size
        try:
            self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
            self.tokenizer = CLIPTokenizer.from_pretrained(processor_dir, local_files_only=True)
            self.image_processor = CLIPImageProcessorPil.from_pretrained(processor_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(f"The CLIP model in {model_dir} (processor files in {processor_dir}) "
                                      f"could not be loaded ({exc}); re-download it in transformers format.") from exc
        self.model.eval().requires_grad_(False).to(device)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> (B, D) float32, unit norm."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        feats = torch.cat(out)
        return feats / feats.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, D) float32, unit norm (each distinct prompt is encoded once)."""
        new = sorted(set(texts) - set(self._text_cache))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start:start + self.batch_size]
            tok = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
            feats = self.model.text_projection(pooled).float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            self._text_cache.update(zip(chunk, feats))
        return torch.stack([self._text_cache[t] for t in texts])
