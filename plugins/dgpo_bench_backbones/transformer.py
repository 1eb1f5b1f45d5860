"""Shared base of backbones built on a diffusers MM-DiT (``SD3Transformer2DModel``).

One code path for every such backbone (nano, SD3): LoRA through peft on the attention
projections (reference = adapters disabled, no second copy) or full fine-tuning of the
transformer (reference = a frozen copy made at load), a per-prompt embedding cache,
and save/load of the trainable weights in formats diffusers loads: LoRA as
``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed keys and the
adapter config as metadata (``StableDiffusion3Pipeline.load_lora_weights``), full
weights as a diffusers ``transformer/`` folder (``SD3Transformer2DModel.from_pretrained``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from dgpo_bench.contracts import Backbone, Conditioning, Options, Prompt
from dgpo_bench.errors import InvalidOptionsError
from dgpo_bench.results import cpu_info
from dgpo_bench.sharding import is_sharded

from .checkpoints import CorruptWeightsError, corrupt, misfit, require_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
"""The attention projections Flow-GRPO and DGPO adapt (joint attention of every block)."""
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_PREFIX = "transformer."
FULL_DIR = "transformer"
FULL_FILE = "diffusion_pytorch_model.safetensors"


class TransformerOptions(Options):
    """Options shared by MM-DiT backbones."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the frozen weights; LoRA weights are always kept in fp32."""
    lora_rank: int = Field(0, ge=0)
    """LoRA rank; 0 trains the whole transformer (text encoders always stay frozen)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (scale = alpha / rank); None means alpha = rank."""
    lora_init: Literal["gaussian", "kaiming"] = "gaussian"
    """LoRA A init (B starts at zero either way): peft's 'gaussian' (as released) or Kaiming-uniform."""
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    gradient_checkpointing: bool = False
    autocast: Literal["auto", "on", "off"] = "off"
    """bf16 autocast of the denoiser's forward (weights and losses stay in their dtype);
    'auto' turns it on for CUDA and for CPUs with native bf16 (AVX512-BF16 or AMX)."""
    compile: Literal["auto", "on", "off"] = "off"
    """torch.compile (inductor) of the denoiser, for rollouts, training and evaluation; its warm-up
    is charged to the run's 'compile' phase. 'auto' compiles where autocast's 'auto' computes in
    bf16 (CUDA, CPUs with native bf16). Without inductor's C++ compiler (CPU) or Triton (GPU), and
    under FSDP2, the run warns in one line and stays eager."""
    prompt_cache: int = Field(65536, ge=0)
    """How many encoded training prompts to keep (least recently used are dropped). Prompts encoded
    during evaluation are kept besides them for the whole run, never dropped. 0 disables both."""


class TransformerBackbone(Backbone):
    """Base for backbones whose denoiser is a diffusers ``SD3Transformer2DModel``.

    A subclass's ``load`` builds its encoders, sets ``latent_shape`` and the defaults,
    then calls ``_attach_transformer``; it implements ``_encode_uncached`` and ``decode``.
    """

    Options = TransformerOptions
    transformer: torch.nn.Module
    world: str | None = None
    """The procedural world (dgpo_bench_tasks) the loaded model was trained on, e.g. nano's
    'text'; its prompt sets are the backbone's default prompts. None: an open-domain model."""

    def __init__(self, options=None):
        super().__init__(options)
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._eval_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._frozen: torch.nn.Module | None = None
        self._reference_depth = 0
        self._compile_pending = False

    # -- for subclasses
    def _encode_uncached(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Encode ``texts`` -> {'encoder_hidden_states': (B, L, D), 'pooled_projections': (B, P)}."""
        raise NotImplementedError

    def _attach_transformer(self, transformer: torch.nn.Module, seed: int) -> None:
        """Take ``transformer`` (already on device and in dtype) and make its trainable part.

        The LoRA init is drawn from ``seed`` so every process starts from the same adapter.
        """
        opts = self.options
        self.transformer = transformer.requires_grad_(False).eval()
        if opts.lora_rank > 0:
            from peft import LoraConfig

            config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha or opts.lora_rank,
                                init_lora_weights=True if opts.lora_init == "kaiming" else "gaussian",
                                target_modules=list(opts.lora_target_modules))
            try:
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    transformer.add_adapter(config)
            except ValueError as exc:
                raise InvalidOptionsError(
                    f"lora_target_modules {opts.lora_target_modules} match no layer of the {self.name} "
                    f"transformer ({str(exc).splitlines()[0][:120]}); use names such as {list(LORA_TARGETS)}."
                ) from None
            for p in self.trainable_parameters():
                p.data = p.data.float()
        else:
            self._frozen = copy.deepcopy(transformer).eval()
            transformer.requires_grad_(True)
        if opts.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self._compile_pending = opts.compile == "on" or (opts.compile == "auto" and self._native_bf16)

    def _compile(self) -> None:
        """Compile the denoiser (and its frozen copy) in place, at the first forward: by then the engine
        has prepared it, and FSDP2-sharded weights stay eager."""
        self._compile_pending = False
        missing = _missing_compiler(self.device)
        if missing or any(is_sharded(p) for p in self.transformer.parameters()):
            why = f"needs {missing}, which is not installed" if missing else "is not supported on FSDP2-sharded weights"
            warnings.warn(f"{self.name}.compile {why}; running eager.", stacklevel=3)
            return
        for module in (self.transformer, self._frozen):
            if module is not None:
                module.compile()

    @property
    def is_lora(self) -> bool:
        return self.options.lora_rank > 0

    # -- contract
    def prompts(self, split: str) -> list[Prompt] | None:
        if self.world is None:
            return None
        from dgpo_bench_tasks import load_prompts

        return [Prompt(item["prompt"], item["metadata"]) for item in load_prompts(self.world, split)]

    def encode_prompts(self, texts: Sequence[str]) -> Conditioning:
        """Encode with a per-text cache: an LRU of ``prompt_cache`` training prompts, and the prompts
        encoded in the meter's 'eval' phase, kept apart for good (a held-out set larger than the LRU
        would otherwise be evicted by training prompts and re-encoded at every evaluation)."""
        texts = list(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self._eval_cache and t not in self._cache]
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        if new:
            with torch.no_grad():
                enc = self._encode_uncached(new)
            fresh = {t: {k: v[i] for k, v in enc.items()} for i, t in enumerate(new)}
        rows = [fresh.get(t) or self._eval_cache.get(t) or self._cache[t] for t in texts]
        out = Conditioning({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
        capacity = self.options.prompt_cache
        if capacity and self.meter.current_phase == "eval":
            for t, row in zip(texts, rows):
                self._eval_cache[t] = row
                self._cache.pop(t, None)
            return out
        for t in texts:
            if t in self._cache:
                self._cache.move_to_end(t)
        for t, row in fresh.items():
            if capacity:
                self._cache[t] = row
        while len(self._cache) > capacity:
            self._cache.popitem(last=False)
        return out

    def _velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self._compile_pending:
            self._compile()
        net = self._frozen if (self._reference_depth and self._frozen is not None) else self.policy_module
        t = cond.tensors
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            out = net(hidden_states=latents.to(self.dtype),
                      encoder_hidden_states=t["encoder_hidden_states"].to(self.dtype),
                      pooled_projections=t["pooled_projections"].to(self.dtype),
                      timestep=sigmas.float() * 1000.0, return_dict=False)[0]
        return out.float()

    @property
    def _autocast(self) -> bool:
        mode = self.options.autocast
        return self._native_bf16 if mode == "auto" else mode == "on"

    @property
    def _native_bf16(self) -> bool:
        """Whether the device computes bf16 natively (CUDA, or a CPU with AVX512-BF16 or AMX)."""
        return self.device.type == "cuda" or (self.device.type == "cpu" and cpu_info()["native_bf16"])

    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    def reference_module(self) -> torch.nn.Module | None:
        return self._frozen

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _reference_weights(self) -> Iterator[None]:
        lora = self._frozen is None
        if lora and self._reference_depth == 0:
            self.transformer.disable_adapters()
        self._reference_depth += 1
        try:
            yield
        finally:
            self._reference_depth -= 1
            if lora and self._reference_depth == 0:
                self.transformer.enable_adapters()

    def train(self, mode: bool = True) -> None:
        self.transformer.train(mode)

    def save_trainable(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        directory = Path(directory)
        state = self.transformer.state_dict() if state is None else state
        if not self.is_lora:
            from safetensors.torch import save_file

            folder = directory / FULL_DIR
            folder.mkdir(parents=True, exist_ok=True)
            self.transformer.save_config(folder)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / FULL_FILE),
                      metadata={"format": "pt"})
            return
        from diffusers.loaders import SD3LoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().float().cpu().contiguous()
                  for k, v in get_peft_model_state_dict(self.transformer, state_dict=state,
                                                        adapter_name="default").items()}
        meta = self.transformer.peft_config["default"].to_dict()
        SD3LoraLoaderMixin.save_lora_weights(directory, transformer_lora_layers=layers,
                                             transformer_lora_adapter_metadata=meta)

    def load_trainable(self, directory: Path) -> None:
        directory = Path(directory)
        fix = "point to a folder written by save_trainable"
        if not self.is_lora:
            require_files(directory, [f"{FULL_DIR}/{FULL_FILE}"], "trained transformer", fix)
            state = _read_safetensors(directory / FULL_DIR / FULL_FILE, "trained transformer")
            try:
                self.transformer.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise misfit("trained transformer", directory / FULL_DIR, exc) from None
            return
        require_files(directory, [LORA_FILE], "LoRA weights", fix + " with lora_rank > 0")
        path = directory / LORA_FILE
        state = _read_safetensors(path, "LoRA weights")
        params = dict(self.transformer.named_parameters())
        wanted = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): k
                  for k in params if ".lora_A.default." in k or ".lora_B.default." in k}
        got = {k[len(LORA_PREFIX):]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
        meta = _lora_metadata(path)
        cfg = self.transformer.peft_config["default"]
        mismatch = (set(got) != set(wanted)
                    or any(got[k].shape != params[wanted[k]].shape for k in got)
                    or (meta and (meta.get("r") != cfg.r or float(meta.get("lora_alpha", cfg.lora_alpha))
                                  != float(cfg.lora_alpha))))
        if mismatch:
            raise CorruptWeightsError(
                f"The LoRA weights at {path} do not fit this backbone's adapter (rank {cfg.r}, alpha "
                f"{cfg.lora_alpha}, {len(wanted)} tensors); set lora_rank, lora_alpha and "
                "lora_target_modules to the values they were trained with."
            )
        with torch.no_grad():
            for k, v in got.items():
                params[wanted[k]].copy_(v)


def _missing_compiler(device: torch.device) -> str | None:
    """What inductor lacks on ``device`` to compile (None if nothing): a C++ compiler or Triton."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton"
    from torch._inductor import config

    return None if any(c and shutil.which(c) for c in config.cpp.cxx) else "a C++ compiler (g++)"


def pixels_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B, C, H, W) -> uint8 (B, H, W, 3); one channel is repeated to RGB."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several unrelated types for a damaged file
        raise corrupt(what, path, exc) from None


def _lora_metadata(path: Path) -> dict:
    """The adapter config diffusers stores in the LoRA file (``transformer.``-prefixed keys)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    packed = json.loads(raw)
    return {k[len(LORA_PREFIX):]: v for k, v in packed.items() if k.startswith(LORA_PREFIX)}
