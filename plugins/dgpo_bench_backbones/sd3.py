"""The ``sd3`` backbone: Stable Diffusion 3 / 3.5 from a local diffusers folder.

Everything that knows about SD3's three text encoders and its VAE lives here; the
LoRA / reference / save-load machinery is the shared ``TransformerBackbone``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from dgpo_bench.contracts import LoadContext
from dgpo_bench.errors import InvalidOptionsError, MissingWeightsError

from .checkpoints import corrupt
from .transformer import DTYPES, TransformerBackbone, TransformerOptions, pixels_to_uint8

PATH_ENV = "DGPO_BENCH_SD3_PATH"
_MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
_REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class SD3Options(TransformerOptions):
    path: str | None = None
    """A local diffusers folder (or a Hub id, when online); default: $DGPO_BENCH_SD3_PATH."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    lora_rank: int = Field(64, ge=0)
    lora_alpha: float | None = 128.0
    resolution: int = Field(512, gt=0)
    """Image side in pixels (latents are resolution / 8)."""
    guidance_scale: float = 4.5
    shift: float | None = None
    """Timestep shift; None reads it from the folder's scheduler config (3.0 for SD3 / 3.5)."""
    max_sequence_length: int = Field(128, gt=0)
    """T5 tokens per prompt (128 as in Flow-GRPO and DGPO)."""
    prompt_cache: int = Field(1024, ge=0)
    """Training prompts kept encoded on the device (about 1.7 MB each for SD3.5 in bf16); held-out
    prompts are kept besides them."""


def check_sd3_folder(folder: Path) -> None:
    """Raise ``MissingWeightsError`` naming every part of a diffusers SD3 folder that is missing."""
    fix = "re-download the model or point path at a complete diffusers folder"
    if not folder.is_dir():
        raise MissingWeightsError(f"The SD3 folder {folder} does not exist; {fix} (option path or ${PATH_ENV}).")
    index = folder / "model_index.json"
    if not index.is_file():
        raise MissingWeightsError(f"{folder} is not a diffusers pipeline folder (no model_index.json); {fix}.")
    try:
        listed = {k for k, v in json.loads(index.read_text()).items()
                  if isinstance(v, list) and v[0] is not None}
    except (ValueError, AttributeError, IndexError, TypeError) as exc:
        raise corrupt("model_index.json", index, exc) from None
    missing = [f"{name} (not in model_index.json)" for name in _REQUIRED if name not in listed]
    for name in sorted(listed & set(_MODELS + _REQUIRED + ("tokenizer_3",))):
        sub = folder / name
        if not sub.is_dir() or not any(sub.iterdir()):
            missing.append(f"{name}/")
        elif name == "scheduler" and not (sub / "scheduler_config.json").is_file():
            missing.append("scheduler/scheduler_config.json")
        elif name in _MODELS and not (sub / "config.json").is_file():
            missing.append(f"{name}/config.json")
        elif name in _MODELS and not any(p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
                                         for p in sub.iterdir()):
            missing.append(f"{name} weights")
    if missing:
        raise MissingWeightsError(f"The SD3 folder {folder} is incomplete (missing {', '.join(missing)}); {fix}.")


class SD3Backbone(TransformerBackbone):
    """Stable Diffusion 3 / 3.5 (Medium, Large) from a local diffusers folder, LoRA via peft."""

    name = "sd3"
    Options = SD3Options

    def load(self, ctx: LoadContext) -> None:
        from diffusers import StableDiffusion3Pipeline

        opts = self.options
        source = opts.path or os.environ.get(PATH_ENV)
        if not source:
            raise MissingWeightsError(
                f"The sd3 backbone needs a Stable Diffusion 3 diffusers folder; set the option path or ${PATH_ENV}."
            )
        local = Path(source).expanduser()
        if local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
            check_sd3_folder(local)
            source = str(local)
        dtype = DTYPES[opts.dtype]
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(source, dtype=dtype)
        except Exception as exc:  # diffusers, hub and safetensors raise many unrelated types
            if local.exists():
                raise corrupt("SD3 pipeline", local, exc) from None
            raise MissingWeightsError(
                f"'{source}' is not a local folder and could not be loaded from the Hugging Face Hub "
                f"({str(exc).splitlines()[0][:160]}); download it first and pass its folder as path."
            ) from None
        pipe.set_progress_bar_config(disable=True)
        pipe.to(ctx.device)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        if opts.resolution % factor:
            raise InvalidOptionsError(
                f"resolution {opts.resolution} is not a multiple of {factor} (VAE factor x patch size); "
                f"use e.g. {max(factor, opts.resolution // factor * factor)}."
            )
        self.pipe = pipe
        self.device, self.dtype = ctx.device, dtype
        side = opts.resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels, side, side)
        self.default_guidance_scale = opts.guidance_scale
        self.default_shift = float(pipe.scheduler.config.get("shift", 3.0)) if opts.shift is None else opts.shift
        self._attach_transformer(pipe.transformer, ctx.seed)

    def _encode_uncached(self, texts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            texts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.options.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> VAE (undoing the pipeline's scaling and shift) -> uint8 (B, H, W, 3)."""
        vae = self.pipe.vae
        x = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return pixels_to_uint8(vae.decode(x, return_dict=False)[0])
