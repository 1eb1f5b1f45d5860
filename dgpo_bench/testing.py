"""Contract checks for plugin authors: call them from your plugin's own tests.

    from dgpo_bench.testing import check_component_class, check_reward

    def test_my_reward_honours_the_contract():
        check_reward(MyReward, {"threshold": 0.5}, images, prompts)

Each check raises ``ContractViolation`` (an AssertionError, so pytest shows it as a
failure) with a sentence saying what is wrong.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from typing import Any, Sequence

import numpy as np
import torch

from .contracts import Backbone, Component, LoadContext, Objective, Options, Prompt, Reward, Sampler
from .errors import DgpoBenchError, InvalidOptionsError
from .registry import Registry

HEAVY_MODULES = ("transformers", "diffusers", "onnxruntime", "rapidocr", "open_clip", "cv2")
"""Libraries that must not be imported by discovering a plugin or constructing a component."""

_KINDS = {"backbone": Backbone, "sampler": Sampler, "objective": Objective, "reward": Reward}


class ContractViolation(AssertionError):
    """A component that does not do what its kind's contract requires."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ContractViolation(message)


def check_component_class(cls: type) -> None:
    """Identity, options and capabilities of a component class of any kind, without building it.

    The class subclasses its kind's base class, has a kebab-case ``name`` (and aliases) the
    registry accepts, a docstring whose first line describes it, ``Options`` that derive
    from ``dgpo_bench.contracts.Options`` and reject unknown keys, and frozenset capabilities.
    """
    _require(isinstance(cls, type) and issubclass(cls, Component), f"{cls!r} is not a dgpo_bench Component class.")
    base = _KINDS.get(cls.kind)
    _require(base is not None and issubclass(cls, base),
             f"{cls.__name__}.kind is {cls.kind!r}; subclass one of Backbone, Sampler, Objective, Reward.")
    try:
        Registry(cls.kind, base).add(cls.name, cls, "contract-check", aliases=tuple(cls.aliases))
    except DgpoBenchError as exc:
        raise ContractViolation(str(exc)) from None
    _require(bool(cls.summary()), f"{cls.__name__} needs a docstring; its first line is shown by 'dgpo-bench plugins'.")
    _require(isinstance(cls.Options, type) and issubclass(cls.Options, Options),
             f"{cls.__name__}.Options must subclass dgpo_bench.contracts.Options.")
    try:
        cls.parse_options({"__no_such_option__": 1})
    except InvalidOptionsError:
        pass
    else:
        raise ContractViolation(f"{cls.__name__}.Options accepts unknown keys; keep model_config extra='forbid'.")
    for attr in ("provides", "requires"):
        value = getattr(cls, attr)
        _require(isinstance(value, frozenset) and all(isinstance(v, str) for v in value),
                 f"{cls.__name__}.{attr} must be a frozenset of capability names, got {value!r}.")


def check_light_import(*components: type | tuple[type, dict[str, Any] | None],
                       heavy: Sequence[str] = HEAVY_MODULES) -> None:
    """Importing each class's module and constructing it imports none of ``heavy``.

    ``components`` are classes or ``(class, options)`` pairs (options JSON-serialisable).
    Runs in one fresh interpreter, so what this process already imported does not count:
    heavy libraries and weights belong in ``load()``.
    """
    pairs = [c if isinstance(c, tuple) else (c, None) for c in components]
    specs = [(cls.__module__, cls.__qualname__, options or {}) for cls, options in pairs]
    script = textwrap.dedent(f"""
        import importlib, json, sys
        for module, qualname, options in json.loads({json.dumps(json.dumps(specs))}):
            getattr(importlib.import_module(module), qualname)(options)
        print(json.dumps([m for m in {list(heavy)!r} if m in sys.modules]))
    """)
    names = ", ".join(cls.__name__ for cls, _ in pairs)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    _require(proc.returncode == 0, f"Importing and constructing {names} failed in a fresh interpreter:\n"
                                   f"{proc.stderr.strip()[-2000:]}")
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    _require(not loaded, f"Importing or constructing {names} imports {', '.join(loaded)}; "
                         "import heavy libraries inside load() instead.")


def _close(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=atol))


def check_reward(reward_cls: type[Reward], options: dict[str, Any] | None = None,
                 images: np.ndarray | None = None, prompts: Sequence[Prompt] | None = None, *,
                 ctx: LoadContext | None = None, atol: float = 1e-5, check_import: bool = True) -> np.ndarray:
    """Build, load and score with ``reward_cls`` and check the reward contract; returns the scores.

    Checks: the class contract (``check_component_class``), declared ``higher_is_better``,
    ``score_range`` and ``groupwise``; a light import and constructor (``check_light_import``);
    one finite float per image inside the declared range; identical scores when called
    again; scores that follow the images when the batch is reversed and, for rewards that
    score images one by one, that do not depend on the rest of the batch (within ``atol``);
    shipped prompt sets for a reward with a ``world``; ``close()`` that can run twice.

    ``images`` are uint8 (B, H, W, 3) with B >= 2 (for a group-wise reward, one complete
    group); by default 4 seeded random 64x64 images. ``prompts`` default to the reward's
    own eval prompts (first B), else a generic prompt.
    """
    check_component_class(reward_cls)
    _require(issubclass(reward_cls, Reward), f"{reward_cls.__name__} is not a Reward.")
    _require(isinstance(reward_cls.higher_is_better, bool), f"{reward_cls.__name__}.higher_is_better must be a bool.")
    _require(isinstance(reward_cls.groupwise, bool), f"{reward_cls.__name__}.groupwise must be a bool.")
    rng = reward_cls.score_range
    _require(rng is None or (len(rng) == 2 and all(math.isfinite(v) for v in rng) and rng[0] < rng[1]),
             f"{reward_cls.__name__}.score_range must be None or (low, high) with low < high, got {rng!r}.")
    if check_import:
        check_light_import((reward_cls, options))

    reward = reward_cls(options)
    reward.load(ctx or LoadContext(device=torch.device("cpu"), world=reward_cls.world))
    try:
        if images is None:
            images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
        n = len(images)
        _require(n >= 2, "check_reward needs at least 2 images.")
        if prompts is None:
            prompts = reward.prompts("eval")[:n] if reward_cls.world else [Prompt("a photo of a cat")] * n
        prompts = list(prompts)

        scores = reward.score(images, prompts)
        _require(isinstance(scores, np.ndarray) and scores.shape == (n,) and scores.dtype.kind == "f",
                 f"score() must return a float numpy array of shape ({n},), got {type(scores).__name__} "
                 f"{getattr(scores, 'dtype', '')} {getattr(scores, 'shape', '')}.")
        _require(bool(np.isfinite(scores).all()), f"score() returned non-finite values {scores}; raise RewardError instead.")
        if rng is not None:
            _require(bool(((scores >= rng[0]) & (scores <= rng[1])).all()),
                     f"score() returned {scores}, outside the declared score_range {rng}.")
        again = reward.score(images, prompts)
        _require(_close(again, scores, atol), f"score() is not deterministic: {scores} then {again}.")
        flipped = reward.score(images[::-1].copy(), prompts[::-1])
        _require(_close(flipped[::-1], scores, atol),
                 f"Scores do not follow their images when the batch is reversed: {scores} vs {flipped[::-1]}.")
        if not reward_cls.groupwise:
            half = n // 2
            part = reward.score(images[:half].copy(), prompts[:half])
            _require(_close(part, scores[:half], atol),
                     f"An image's score depends on the rest of the batch: {part} alone vs {scores[:half]}; "
                     "a reward that compares images must set groupwise = True.")
        if reward_cls.world is not None:
            for split in ("train", "eval"):
                shipped = reward.prompts(split)
                _require(len(shipped) > 0 and all(isinstance(p, Prompt) for p in shipped),
                         f"prompts({split!r}) must return a non-empty list of Prompt for world {reward_cls.world!r}.")
    finally:
        reward.close()
    reward.close()
    return scores


class _CountingModule(torch.nn.Module):
    """Wraps a module and counts its forward calls (a stand-in for the engine's prepared module)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def check_backbone_training(backbone: Backbone, latents: torch.Tensor, sigmas: torch.Tensor,
                            texts: Sequence[str]) -> None:
    """A loaded backbone trains through the module the engine prepares.

    Checks: ``trainable_parameters()`` are parameters of ``trainable_module()`` and all
    require gradients; after ``use_prepared(wrapper)`` the policy ``velocity`` calls the
    wrapper (so DDP/FSDP synchronise gradients in that forward) and its gradient reaches
    the trainable parameters; the reference pass does not depend on the trainable weights.
    """
    module = backbone.trainable_module()
    owned = {id(p) for p in module.parameters()}
    params = backbone.trainable_parameters()
    _require(bool(params) and all(id(p) in owned and p.requires_grad for p in params),
             "trainable_parameters() must be parameters of trainable_module() that require gradients.")
    wrapper, previous = _CountingModule(module), backbone._prepared
    backbone.use_prepared(wrapper)
    try:
        cond = backbone.encode_prompts(list(texts))
        v = backbone.velocity(latents, sigmas, cond)
        _require(wrapper.calls >= 1, "velocity() did not call the prepared module; run the trainable weights through "
                                     "self.policy_module in _velocity.")
        grads = torch.autograd.grad(v.float().square().sum(), params, allow_unused=True)
        _require(any(g is not None and bool(g.abs().sum() > 0) for g in grads),
                 "The policy velocity's gradient reaches no trainable parameter.")
        with torch.no_grad(), backbone.reference():
            ref = backbone.velocity(latents, sigmas, cond)
        _require(not ref.requires_grad, "The reference velocity must not carry a gradient under torch.no_grad.")
    finally:
        backbone.use_prepared(previous)


def force_fsdp2_on_cpu() -> None:
    """Make accelerate take its own FSDP2 path in this CPU process (call it before anything builds an
    Accelerator); for tests and ``--tiny`` benchmarks of sharded code on machines without a GPU.

    accelerate 1.15 maps a multi-process CPU run to MULTI_CPU (DDP) even with an FSDP plugin, though
    torch's ``fully_shard`` runs on CPU under gloo. This builds the FSDP plugin from the ``FSDP_*``
    variables that ``accelerate launch --config_file`` sets (FSDP2 by default) and sets the distributed
    type to FSDP on both of accelerate's shared states; ``accelerator.prepare`` then shards with
    ``fully_shard`` as it does on GPUs.
    """
    import os

    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    os.environ.setdefault("FSDP_VERSION", "2")
    plugin = FullyShardedDataParallelPlugin()
    Accelerator(cpu=True, fsdp_plugin=plugin)
    PartialState().distributed_type = DistributedType.FSDP
    AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
