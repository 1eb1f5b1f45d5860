"""What every component kind must do: Backbone, Sampler, Objective, Reward.

Components are classes registered under a kebab-case ``name``. Each declares typed
``Options`` (unknown keys rejected) and capabilities (``provides``/``requires``) that
the resolver checks before any model is built. Heavy work happens in ``load()``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InvalidOptionsError
from .meters import CostMeter
from .sharding import is_sharded, reshard

if TYPE_CHECKING:
    from accelerate import Accelerator


class Options(BaseModel):
    """Base of every component's option schema: typed, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid")


class Component:
    """Common base: identity, typed options and declared capabilities."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | dict[str, Any] | None = None):
        self.options = self.parse_options(options)

    @classmethod
    def parse_options(cls, raw: Options | dict[str, Any] | None) -> Options:
        if isinstance(raw, cls.Options):
            return raw
        try:
            return cls.Options.model_validate(dict(raw or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "options"
            known = ", ".join(cls.Options.model_fields) or "none"
            if err["type"] == "extra_forbidden":
                msg = f"{cls.kind} '{cls.name}' has no option '{key}'; its options are: {known}."
            else:
                msg = f"Invalid option {key} for {cls.kind} '{cls.name}': {err['msg']} (got {err.get('input')!r})."
            raise InvalidOptionsError(msg) from None

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Prompt:
    """A prompt and whatever a reward needs to score it (e.g. OCR target, scene)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conditioning:
    """Encoded prompts: named tensors whose first dimension is the batch."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> "Conditioning":
        if not isinstance(index, (slice, torch.Tensor)):
            index = torch.as_tensor(list(index), dtype=torch.long)
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        keys = parts[0].tensors
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})


class SampleNoise:
    """Independent, reproducible Gaussian streams, one per sample.

    Each sample's noise depends only on its own seed, so a sample draws the same
    noise whichever process and batch it lands in.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, index: slice) -> "SampleNoise":
        """The streams of samples ``index`` (shared, not copied)."""
        sub = SampleNoise([], self.device)
        sub.generators = self.generators[index]
        return sub

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        draws = [torch.randn(*shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=self.device, dtype=dtype)


@dataclass
class SampleOutput:
    """What a sampler returns. ``trajectory`` is (B, T+1, C, H, W), x_T first."""

    latents: torch.Tensor
    sigmas: torch.Tensor
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None


# --------------------------------------------------------------------------- backbone


@dataclass
class LoadContext:
    """What the engine tells a backbone or reward when it is built."""

    device: torch.device
    world: str | None = None
    """The prompt world of the run ('text', 'shapes', ...) for backbones that ship one model per world."""
    seed: int = 0


class Backbone(Component):
    """A text-to-image flow model: x_t = (1 - s) x0 + s eps, predicts v = eps - x0.

    Subclasses implement ``load``, ``encode_prompts``, ``_velocity``, ``decode``,
    ``trainable_module``, ``trainable_parameters``, ``_reference_weights`` and the save/load
    of trainable weights. Callers use ``velocity`` which applies CFG and charges the cost
    meter, so no component can evaluate the model without the engine seeing it.
    ``_velocity`` runs the trainable weights through ``policy_module``: the engine prepares
    ``trainable_module()`` with accelerate (DDP, FSDP2, DeepSpeed) and hands the result back
    through ``use_prepared``, so gradient synchronisation happens in those forwards.
    """

    kind = "backbone"
    latent_shape: tuple[int, int, int] = (0, 0, 0)
    default_guidance_scale: float = 1.0
    default_shift: float = 1.0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __init__(self, options: Options | dict[str, Any] | None = None):
        super().__init__(options)
        self.meter = CostMeter()
        self._role = "policy"
        self._null_cond: Conditioning | None = None
        self._prepared: torch.nn.Module | None = None

    # -- implemented by plugins
    def load(self, ctx: LoadContext) -> None:
        raise NotImplementedError

    def encode_prompts(self, texts: Sequence[str]) -> Conditioning:
        """Encode prompts (implementations cache by text); '' is the CFG null prompt."""
        raise NotImplementedError

    def _velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One conditional forward pass; ``sigmas`` has shape (B,) in [0, 1]."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents to uint8 images of shape (B, H, W, 3)."""
        raise NotImplementedError

    def trainable_module(self) -> torch.nn.Module:
        """The module that holds every trainable parameter (the one the engine prepares)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train, read from ``trainable_module()`` at each call (preparing
        a module for sharding replaces its parameters)."""
        raise NotImplementedError

    def reference_module(self) -> torch.nn.Module | None:
        """The separate frozen copy the reference evaluates with, if the backbone keeps one (full
        fine-tuning); None where the reference is the trainable module with its adapters disabled.
        Under FSDP2 the engine shards it in place, for inference only (no optimizer)."""
        return None

    def _reference_weights(self) -> contextlib.AbstractContextManager:
        """Context in which the model computes with its frozen base weights."""
        raise NotImplementedError

    def save_trainable(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights in a format the ecosystem loads. ``state`` is the whole state dict
        of ``trainable_module()`` (the engine gathers it when the module is sharded); None: read it
        from the module."""
        raise NotImplementedError

    def load_trainable(self, directory: Path) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        """Switch dropout/normalisation modes of the trainable modules."""

    def prompts(self, split: str) -> list[Prompt] | None:
        """Default prompts for ``split`` ('train' or 'eval'), used when no reward ships any and no
        prompt file is given; None if the loaded model has none."""
        return None

    # -- shared behaviour
    @property
    def role(self) -> str:
        return self._role

    @property
    def policy_module(self) -> torch.nn.Module:
        """What ``_velocity`` calls for the trainable weights: the prepared module once there is one."""
        return self._prepared if self._prepared is not None else self.trainable_module()

    def use_prepared(self, module: torch.nn.Module) -> None:
        """Run later forwards of the trainable weights through ``module``, the prepared ``trainable_module()``."""
        self._prepared = module

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor | float, cond: Conditioning,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """Velocity at ``sigmas``, with classifier-free guidance when ``guidance_scale != 1``."""
        b = latents.shape[0]
        sig = torch.as_tensor(sigmas, device=latents.device, dtype=torch.float32)
        sig = sig.expand(b) if sig.ndim == 0 else sig
        if guidance_scale == 1.0:
            self.meter.add_nfe(self._role, b)
            return self._velocity(latents, sig, cond)
        self.meter.add_nfe(self._role, 2 * b)
        v = self._velocity(torch.cat([latents, latents]), torch.cat([sig, sig]),
                           Conditioning.cat([self.null_conditioning(b), cond]))
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def null_conditioning(self, batch: int) -> Conditioning:
        if self._null_cond is None:
            self._null_cond = self.encode_prompts([""])
        return Conditioning({k: v.expand(batch, *v.shape[1:]) for k, v in self._null_cond.tensors.items()})

    @contextlib.contextmanager
    def as_role(self, role: str) -> Iterator[None]:
        outer, self._role = self._role, role
        try:
            yield
        finally:
            self._role = outer

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Evaluate with the frozen base model (LoRA disabled or frozen copy)."""
        with self.as_role("reference"), self._reference_weights():
            yield

    @contextlib.contextmanager
    def swapped_weights(self, tensors: Sequence[torch.Tensor], role: str = "ema") -> Iterator[None]:
        """Temporarily load ``tensors`` into the trainable parameters (e.g. EMA weights).

        Under ``torch.no_grad`` (EMA rollouts and passes) a parameter whose tensor has the same
        dtype, device, shape and strides is pointed at it rather than copied (no clone, copy in and
        copy back of every weight), so the parameters must not be changed in place inside the block:
        that would change ``tensors``. With gradients on, where the dtype differs (the copy rounds)
        or where the parameter is sharded (FSDP2 gathers from its own storage), the values are
        copied in and the old ones restored afterwards.
        """
        reshard(self.policy_module)
        params = self.trainable_parameters()
        lend = not torch.is_grad_enabled()
        with torch.no_grad():
            saved: list[tuple[torch.nn.Parameter, torch.Tensor, bool]] = []
            for p, t in zip(params, tensors):
                shared = (lend and not is_sharded(p) and not is_sharded(t) and t.dtype == p.dtype and t.device == p.device
                          and t.layout == p.layout and t.shape == p.shape and t.stride() == p.stride())
                saved.append((p, p.data, shared) if shared else (p, p.detach().clone(), shared))
                if shared:
                    p.data = t.detach()
                else:
                    p.copy_(t)
        try:
            with self.as_role(role):
                yield
        finally:
            with torch.no_grad():
                for p, old, shared in saved:
                    if shared:
                        p.data = old
                    else:
                        p.copy_(old)


# --------------------------------------------------------------------------- sampler


class SamplerOptions(Options):
    steps: int = 10
    guidance_scale: float | None = None
    """CFG scale; None uses the backbone's default."""
    shift: float | None = None
    """Timestep shift of the flow schedule; None uses the backbone's default."""


class Sampler(Component):
    """Integrates a backbone's flow from noise (sigma 1) to an image (sigma 0)."""

    kind = "sampler"
    Options = SamplerOptions
    provides = frozenset({"trajectory"})

    def guidance(self, backbone: Backbone) -> float:
        g = self.options.guidance_scale
        return backbone.default_guidance_scale if g is None else g

    def shift(self, backbone: Backbone) -> float:
        s = self.options.shift
        return backbone.default_shift if s is None else s

    def sample(self, backbone: Backbone, cond: Conditioning, noise: torch.Tensor, *,
               step_noise: SampleNoise | None = None, trajectory: bool = False) -> SampleOutput:
        """Run the sampler. ``step_noise`` feeds stochastic steps, one stream per sample."""
        raise NotImplementedError


class StochasticSampler(Sampler):
    """A sampler with Gaussian transitions whose log-probs it reports (``provides`` log_probs).

    ``sample`` returns ``log_probs`` (B, T), NaN at deterministic steps. Policy-gradient
    objectives re-score stored transitions under the current weights with ``step_log_prob``.
    """

    provides = frozenset({"trajectory", "log_probs"})

    def stochastic_steps(self, num_steps: int) -> list[int]:
        """Indices k of the steps x_k -> x_{k+1} that draw noise (and so have a log-prob)."""
        raise NotImplementedError

    def step_log_prob(self, backbone: Backbone, cond: Conditioning, x: torch.Tensor, x_next: torch.Tensor,
                      sigmas: torch.Tensor, k: int, guidance_scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log_prob (B,), mean of x_next, the step's std_dev_t) of x -> x_next at step ``k``
        of the grid ``sigmas``, under the backbone's current weights (differentiable)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- objective


class OptimizerOptions(Options):
    """Optimizer settings every objective exposes (AdamW)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0


@dataclass
class RolloutBatch:
    """This process's share of one optimizer update's samples, with their rewards.

    A rollout holds ``prompts_per_step`` complete groups; with ``updates_per_rollout`` k it is
    split into k updates, each a ``RolloutBatch``. ``group_ids`` and ``sample_ids`` number the
    groups and samples of the whole rollout, on every process alike.
    """

    prompts: list[Prompt]
    cond: Conditioning
    noise: torch.Tensor
    latents: torch.Tensor
    sigmas: torch.Tensor
    group_ids: torch.Tensor
    """Global group index of each local sample."""
    rewards: torch.Tensor
    guidance_scale: float
    sample_ids: torch.Tensor
    """Global index of each local sample in the rollout (its row in ``rollout_rewards``)."""
    rollout_rewards: torch.Tensor
    """Every sample's reward in the rollout, on every process, by global sample index."""
    rollout_group_ids: torch.Tensor
    """Every sample's group in the rollout, by global sample index."""
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class StepOutput:
    """Diagnostics of one optimizer update; ``advantages`` are logged per sample."""

    metrics: dict[str, float]
    advantages: torch.Tensor | None = None


@dataclass
class Update:
    """One optimizer update as an objective plans it (see ``Objective.update``)."""

    passes: int
    """How many losses ``losses`` yields: one backward pass each, the same number on every process."""
    losses: Iterator[torch.Tensor]
    """A generator of ``passes`` scalar losses whose ``return`` value is the update's ``StepOutput``."""


class TrainContext:
    """What the engine lends an objective for one run (see engine.Engine)."""

    backbone: Backbone
    sampler: Sampler
    accelerator: "Accelerator"
    step: int
    """Optimizer steps done before this update."""
    num_groups: int
    """Groups in the rollout (``prompts_per_step``)."""
    group_size: int

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    def rng(self, *keys: int) -> torch.Generator:
        """A generator seeded from the run seed, the optimizer step and ``keys``, identical on every process."""
        raise NotImplementedError

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-sample tensor across processes (in global sample order)."""
        raise NotImplementedError

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def group_sum(self, values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-group sums of a per-sample tensor over every process -> (num_groups,)."""
        raise NotImplementedError


class Objective(Component):
    """Turns an update's samples into losses; the engine owns backward, accumulation and the step.

    Rules the engine enforces or relies on (``Objective.update``):

    - **Losses, not steps.** ``update`` returns an ``Update``: a count of passes and a generator
      yielding that many scalar losses. The engine calls ``backward`` on each (accumulating
      without gradient synchronisation until the last), clips, steps the prepared optimizer and
      zeroes the gradients. An objective never calls ``backward``, ``step`` or ``zero_grad``.
    - **One policy forward with gradients per pass**, through ``Backbone.velocity`` or the
      sampler's ``step_log_prob``; reference and EMA passes run under ``torch.no_grad``.
    - **Global normalisation.** The update's loss is the sum of every yielded loss over every
      pass and every process, so divide by global counts (``len(batch) * ctx.num_processes``
      samples, all valid pairs, ...), never by this process's. The engine scales for the
      average over processes that DDP, FSDP and DeepSpeed apply to gradients.
    - **Same passes everywhere.** Every process yields the same number of passes (sharded
      weights are gathered at each forward); the engine checks it and refuses a mismatch.
    - **Diagnostics** returned by the generator are identical on every process (reduce them
      with ``dgpo_bench_objectives.training.reduce_metrics`` or collectives of the context).
    - ``after_update`` runs once after each optimizer step (e.g. to move an EMA).
    """

    kind = "objective"
    Options = OptimizerOptions
    default_sampler: ClassVar[str] = "ode-euler"
    needs_trajectory: ClassVar[bool] = False
    shuffle_updates: ClassVar[bool] = False
    """With ``updates_per_rollout`` k > 1: True deals the rollout's samples at random into the k
    updates (Flow-GRPO's release shuffles its samples before splitting them); False gives each
    update ``prompts_per_step / k`` complete groups (for losses that compare a group's members)."""

    @classmethod
    def check_sampler(cls, options: Options, sampler: type[Sampler], sampler_options: SamplerOptions) -> None:
        """Refuse a rollout sampler setting this objective cannot train with (raise
        ``IncompatibleComponentsError``); called by the resolver, before any model is built."""

    def setup(self, ctx: TrainContext) -> None:
        """Called once after the backbone is loaded (e.g. to copy EMA weights)."""

    def rollout_weights(self, ctx: TrainContext) -> contextlib.AbstractContextManager:
        """Context in which the next rollouts are generated (default: current weights)."""
        return contextlib.nullcontext()

    def update(self, batch: RolloutBatch, ctx: TrainContext) -> Update:
        """Plan one optimizer update on ``batch`` (see the class docstring for the rules)."""
        raise NotImplementedError

    def after_update(self, ctx: TrainContext) -> None:
        """Called after each optimizer step, with ``ctx.step`` still the step just taken."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""


# --------------------------------------------------------------------------- reward


class Reward(Component):
    """Scores (image, prompt) pairs; never returns a constant to hide a failure."""

    kind = "reward"
    higher_is_better: ClassVar[bool] = True
    score_range: ClassVar[tuple[float, float] | None] = None
    groupwise: ClassVar[bool] = False
    """If True, ``score`` is called with one complete group at a time."""
    world: ClassVar[str | None] = None
    """The prompt world whose prompt sets this reward ships (``prompts``)."""
    declared_at_load: ClassVar[bool] = False
    """True if ``world``, ``groupwise``, ``higher_is_better`` and ``score_range`` are only known
    once loaded (e.g. read from a server): the engine then checks them on the loaded instance."""

    def load(self, ctx: LoadContext) -> None:
        """Build heavy state (models, worker pools)."""

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        """uint8 images (B, H, W, 3) and their prompts -> float scores (B,)."""
        raise NotImplementedError

    def prompts(self, split: str) -> list[Prompt]:
        """Shipped prompts for ``split`` in {'train', 'eval'}."""
        raise NotImplementedError(f"reward '{self.name}' ships no prompt set")

    def close(self) -> None:
        """Release workers and servers."""
