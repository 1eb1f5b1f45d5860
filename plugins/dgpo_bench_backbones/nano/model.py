"""Nano text-to-image flow model in pixel space.

A diffusers ``SD3Transformer2DModel`` (MMDiT, the SD3/SD3.5 architecture at toy size)
on RGB pixels in [-1, 1], conditioned by a small character-level text encoder.
Rectified flow as in SD3: ``x_t = (1 - s) x0 + s eps``, target ``v = eps - x0``,
``timestep = s * 1000``.  The empty prompt "" is the null condition for CFG.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

# characters known to the tokenizer (lower-cased input); 0 = pad, 1 = bos, 2 = unk
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 \"'-.,!?:;()&/"
PAD_ID, BOS_ID, UNK_ID = 0, 1, 2
_CHAR_TO_ID = {c: i + 3 for i, c in enumerate(CHARS)}
VOCAB_SIZE = len(CHARS) + 3


def tokenize(prompts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): ids B x max_len (bos + chars, padded / truncated), mask True = real."""
    ids = torch.full((len(prompts), max_len), PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks = [BOS_ID] + [_CHAR_TO_ID.get(c, UNK_ID) for c in p.lower()]
        toks = toks[:max_len]
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return ids, ids != PAD_ID


def quote_positions(prompts: Sequence[str], max_len: int, max_quote: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of ``tokenize``'s layout: (index inside the first quoted span, 1-based,
    0 elsewhere; that span's length on its tokens, 0 elsewhere), both capped at max_quote."""
    pos = torch.zeros((len(prompts), max_len), dtype=torch.long)
    length = torch.zeros_like(pos)
    for i, p in enumerate(prompts):
        a = p.find('"')
        b = p.find('"', a + 1) if a >= 0 else -1
        if b <= a + 1:
            continue
        n = min(b - a - 1, max_quote)
        for k in range(n):
            j = a + 2 + k  # +1 for bos, +1 past the opening quote
            if j < max_len:
                pos[i, j], length[i, j] = k + 1, n
    return pos, length


@dataclasses.dataclass
class NanoConfig:
    world: str = "text"
    height: int = 32
    width: int = 128
    channels: int = 3
    patch_size: int = 4
    num_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 64
    joint_attention_dim: int = 128
    pooled_projection_dim: int = 128
    text_max_len: int = 56
    text_layers: int = 1
    text_heads: int = 2
    text_ff_mult: int = 4
    # embed each character's index inside the quoted span and the span's length (the
    # OCR target), so a tiny encoder need not find the quotes itself; 0 = off
    quote_max_len: int = 0
    # default inference settings (used by evaluation and by the engine as defaults)
    guidance_scale: float = 3.0
    num_inference_steps: int = 10
    shift: float = 1.0
    cond_dropout: float = 0.1

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_tiles_canvas(self) -> bool:
        """Whether ``patch_size`` divides both sides of the canvas (the transformer needs it)."""
        return self.height % self.patch_size == 0 and self.width % self.patch_size == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NanoConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CharTextEncoder(nn.Module):
    """Char embedding + learned positions + pre-norm transformer encoder.

    Returns (encoder_hidden_states B x L x D, pooled B x D = masked mean)."""

    def __init__(self, cfg: NanoConfig):
        super().__init__()
        d = cfg.joint_attention_dim
        self.max_len = cfg.text_max_len
        self.tok = nn.Embedding(VOCAB_SIZE, d)
        self.pos = nn.Parameter(torch.zeros(1, cfg.text_max_len, d))
        nn.init.normal_(self.pos, std=0.02)
        self.quote_max_len = cfg.quote_max_len
        if cfg.quote_max_len:
            self.quote_pos = nn.Embedding(cfg.quote_max_len + 1, d)
            self.quote_len = nn.Embedding(cfg.quote_max_len + 1, d)
        layer = nn.TransformerEncoderLayer(
            d, cfg.text_heads, d * cfg.text_ff_mult, dropout=0.0, batch_first=True,
            norm_first=True, activation="gelu",
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.pool_proj = nn.Linear(d, cfg.pooled_projection_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, quote: tuple | None = None):
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        if quote is not None:
            h = h + self.quote_pos(quote[0]) + self.quote_len(quote[1])
        h = self.encoder(h, src_key_padding_mask=~mask)
        h = self.norm(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return h, self.pool_proj(pooled)


class NanoModel(nn.Module):
    def __init__(self, cfg: NanoConfig):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.config = cfg
        p = cfg.patch_size
        self.transformer = SD3Transformer2DModel(
            sample_size=max(cfg.height, cfg.width),
            patch_size=p,
            in_channels=cfg.channels,
            out_channels=cfg.channels,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.joint_attention_dim,
            caption_projection_dim=cfg.inner_dim,
            pooled_projection_dim=cfg.pooled_projection_dim,
            pos_embed_max_size=max(cfg.height, cfg.width) // p,
        )
        self.text_encoder = CharTextEncoder(cfg)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize(list(prompts), self.config.text_max_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        quote = None
        if self.config.quote_max_len:
            qp, ql = quote_positions(list(prompts), self.config.text_max_len, self.config.quote_max_len)
            quote = (qp.to(self.device), ql.to(self.device))
        return self.text_encoder(ids, mask, quote)

    def forward(self, latents, sigmas, encoder_hidden_states, pooled):
        sigmas = torch.as_tensor(sigmas, device=latents.device, dtype=latents.dtype)
        if sigmas.ndim == 0:
            sigmas = sigmas.expand(latents.shape[0])
        sigmas = sigmas.reshape(latents.shape[0])
        return self.transformer(
            hidden_states=latents,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled,
            timestep=sigmas * 1000.0,
            return_dict=False,
        )[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- io
def build_nano(cfg: NanoConfig | dict) -> NanoModel:
    if isinstance(cfg, dict):
        cfg = NanoConfig.from_dict(cfg)
    return NanoModel(cfg)


def save_nano(model: NanoModel, path: str | Path, dtype: torch.dtype | None = None,
              extra_config: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"))
    cfgd = model.config.to_dict()
    if extra_config:
        cfgd.update(extra_config)
    (path / "config.json").write_text(json.dumps(cfgd, indent=2) + "\n")


def load_nano(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> NanoModel:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = NanoConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = NanoModel(cfg)
    sd = load_file(str(path / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device=device, dtype=dtype).eval()


def default_weights_dir(world: str) -> Path:
    return Path(__file__).resolve().parent / "weights" / world


# ----------------------------------------------------------------------------- sampling
def to_uint8(x: torch.Tensor):
    """B x C x H x W in [-1, 1] -> numpy uint8 B x H x W x C."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(model: NanoModel, prompts: Sequence[str], seed: int = 0,
             num_steps: int | None = None, guidance_scale: float | None = None,
             shift: float | None = None, autocast: bool = False,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Reference sampler (diffusers FlowMatchEulerDiscreteScheduler, CFG with "").
    Returns B x C x H x W in [-1, 1] (float32, clamped)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = model.config
    num_steps = num_steps or cfg.num_inference_steps
    g = cfg.guidance_scale if guidance_scale is None else guidance_scale
    shift = cfg.shift if shift is None else shift
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(num_steps)
    B = len(prompts)
    dev = model.device
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(B, cfg.channels, cfg.height, cfg.width, generator=gen)
    x = noise.to(dev, torch.float32)
    use_cfg = g is not None and g != 1.0
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        if use_cfg:
            ehs, pooled = model.encode(list(prompts) + [""] * B)
        else:
            ehs, pooled = model.encode(list(prompts))
        for t in sched.timesteps:
            sig = (t / 1000.0).to(dev).expand(B)
            if use_cfg:
                v = model(torch.cat([x, x]).to(ehs.dtype), torch.cat([sig, sig]), ehs, pooled).float()
                vc, vu = v.chunk(2)
                v = vu + g * (vc - vu)
            else:
                v = model(x.to(ehs.dtype), sig, ehs, pooled).float()
            x = sched.step(v, t, x, return_dict=False)[0]
    return x.clamp(-1, 1)
