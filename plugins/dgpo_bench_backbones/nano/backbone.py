"""The ``nano`` backbone: the shipped pixel-space MM-DiT with its char-level text encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dgpo_bench.contracts import LoadContext
from dgpo_bench.errors import MissingWeightsError

from ..checkpoints import corrupt, require_files
from ..transformer import DTYPES, TransformerBackbone, TransformerOptions, pixels_to_uint8

WORLDS = ("text", "shapes")


class NanoOptions(TransformerOptions):
    world: Literal["auto", "text", "shapes"] = "auto"
    """Which shipped checkpoint to load; 'auto' follows the run's prompt world (text if it has none)."""
    weights: Path | None = None
    """A checkpoint folder (config.json + model.safetensors) to load instead of the shipped one."""
    autocast: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"


class NanoBackbone(TransformerBackbone):
    """Tiny pixel-space SD3-architecture model that ships with dgpo-bench (text and shapes worlds)."""

    name = "nano"
    Options = NanoOptions

    def load(self, ctx: LoadContext) -> None:
        from .model import default_weights_dir, load_nano

        opts = self.options
        world = opts.world if opts.world != "auto" else (ctx.world or "text")
        if opts.weights is None and world not in WORLDS:
            raise MissingWeightsError(
                f"The nano backbone ships weights for the worlds {' and '.join(WORLDS)}, not '{world}'; "
                "set the option world or weights=<folder> with a nano checkpoint."
            )
        path = Path(opts.weights) if opts.weights is not None else default_weights_dir(world)
        fix = ("pass weights=<folder> with a nano checkpoint (config.json + model.safetensors), "
               "or reinstall dgpo-bench, whose package ships them")
        what = "nano checkpoint" if opts.weights is not None else f"shipped nano '{world}' checkpoint"
        require_files(path, ["config.json", "model.safetensors"], what, fix)
        try:
            model = load_nano(path, device=ctx.device, dtype=DTYPES[opts.dtype])
        except Exception as exc:  # bad JSON, damaged safetensors, or tensors that do not fit the config
            raise corrupt("nano checkpoint", path, exc) from None
        self.model = model
        self.model.text_encoder.requires_grad_(False)
        self.device, self.dtype = ctx.device, DTYPES[opts.dtype]
        cfg = model.config
        self.world = cfg.world
        self.latent_shape = (cfg.channels, cfg.height, cfg.width)
        self.default_guidance_scale, self.default_shift = float(cfg.guidance_scale), float(cfg.shift)
        self._attach_transformer(model.transformer, ctx.seed)

    def _encode_uncached(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ehs, pooled = self.model.encode(texts)
        return {"encoder_hidden_states": ehs, "pooled_projections": pooled}

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Pixels in [-1, 1] (B, C, H, W) -> uint8 (B, H, W, 3)."""
        return pixels_to_uint8(latents)
