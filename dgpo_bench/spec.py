"""Run specifications: validated config with precedence CLI > file > preset > defaults."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentRef(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class WeightedReward(ComponentRef):
    weight: float = 1.0


class Budget(_Strict):
    """Training stops at whichever limit is reached first (eval time is not charged)."""

    steps: int | None = 20
    seconds: float | None = None
    images: int | None = None
    reward_calls: int | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> "Budget":
        if all(v is None for v in (self.steps, self.seconds, self.images, self.reward_calls)):
            raise ValueError("set at least one of steps, seconds, images, reward_calls")
        return self


class EvalEma(_Strict):
    """A slow EMA of the trainable weights, used for evaluation and the exported weights
    (Flow-GRPO's and DGPO's released code: decay 0.9, updated every 8 optimizer steps)."""

    decay: float = Field(0.9, gt=0, lt=1)
    every: int = Field(8, ge=1)
    """Update after every N optimizer steps, with decay min(decay, (1 + k) / (10 + k)) at step k."""


class EvalSpec(_Strict):
    """The evaluation protocol, owned by the engine and identical for every objective."""

    sampler: ComponentRef = Field(default_factory=lambda: ComponentRef(name="ode-euler"))
    rewards: list[ComponentRef] = Field(default_factory=list)
    """Rewards reported but not trained on (the training rewards are always evaluated)."""
    prompts: int = Field(256, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0])
    every: int = Field(0, ge=0)
    """Evaluate every N optimizer steps (0: only before and after training)."""
    batch_size: int = Field(64, ge=1)
    grid: int = Field(16, ge=0)
    """Number of held-out prompts drawn in the sample grid PNG."""
    ema: EvalEma | None = None
    """Evaluate and export a slow EMA of the weights (None: the current weights)."""


class PromptFiles(_Strict):
    train: str | None = None
    eval: str | None = None


class RunSpec(_Strict):
    name: str | None = None
    preset: str | None = None
    backbone: ComponentRef = Field(default_factory=lambda: ComponentRef(name="nano"))
    objective: ComponentRef = Field(default_factory=lambda: ComponentRef(name="dgpo"))
    sampler: ComponentRef | None = None
    """Rollout sampler; None uses the objective's default."""
    rewards: list[WeightedReward] = Field(default_factory=lambda: [WeightedReward(name="ocr")])
    group_size: int = 16
    prompts_per_step: int = 8
    budget: Budget = Field(default_factory=Budget)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    prompts: PromptFiles = Field(default_factory=PromptFiles)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)
    """Save a resumable checkpoint every N steps (0: only at the end); with updates_per_rollout > 1, at
    the first rollout boundary at or after each multiple of N."""
    updates_per_rollout: int = Field(1, ge=1)
    """Optimizer steps taken on one rollout of prompts_per_step groups, each on 1/k of its samples
    (Flow-GRPO's release takes 2, the second off-policy); budgets count optimizer steps."""
    rollout_batch_size: int = Field(0, ge=0)
    """Images per sampler call during rollouts (0: the whole local batch at once)."""
    log_samples: bool = False
    """Write per-sample rewards and advantages of every step to rollouts.jsonl."""

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < 2:
            raise ValueError("a group needs at least 2 samples")
        return v

    @field_validator("prompts_per_step")
    @classmethod
    def _pps(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: list[WeightedReward]) -> list[WeightedReward]:
        if not v:
            raise ValueError("at least one training reward is needed")
        return v

    @model_validator(mode="after")
    def _updates(self) -> "RunSpec":
        k = self.updates_per_rollout
        if self.prompts_per_step % k:
            raise ValueError(f"updates_per_rollout={k} must divide prompts_per_step={self.prompts_per_step} (each "
                             "update trains on prompts_per_step / updates_per_rollout groups' worth of samples)")
        return self

    @property
    def images_per_step(self) -> int:
        return self.group_size * self.prompts_per_step

    def component_refs(self) -> dict[str, ComponentRef]:
        """Every component reference by its role in the run."""
        refs: dict[str, ComponentRef] = {"backbone": self.backbone, "objective": self.objective,
                                         "eval-sampler": self.eval.sampler}
        if self.sampler is not None:
            refs["sampler"] = self.sampler
        refs.update({f"reward:{r.name}": r for r in self.rewards})
        refs.update({f"eval-reward:{r.name}": r for r in self.eval.rewards})
        return refs


# --------------------------------------------------------------------------- building


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON spec file."""
    if not path.is_file():
        raise SpecError(f"Config file {path} does not exist; check the path.")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"Config file {path} is not valid {path.suffix[1:].upper()}: {exc}.") from None


def validate_spec(data: dict[str, Any], source: str = "spec") -> RunSpec:
    try:
        return RunSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        if err["type"] == "extra_forbidden":
            raise SpecError(f"Unknown setting '{where}' in {source}; see 'dgpo-bench run --help' for the settings.") from None
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            raise SpecError(f"Invalid settings in {source}: {msg}.") from None
        raise SpecError(f"Invalid setting '{where}' in {source}: {msg}.") from None


def parse_rewards(text: str) -> list[dict[str, Any]]:
    """'ocr' or 'ocr=1,aesthetic=0.5' -> weighted reward refs."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, weight = part.partition("=")
        try:
            out.append({"name": name.strip(), "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise SpecError(f"Reward weight in '{part}' is not a number; write e.g. --reward ocr=1,aesthetic=0.5.") from None
    if not out:
        raise SpecError("--reward is empty; give a reward name such as --reward ocr.")
    return out


def parse_value(raw: str) -> Any:
    """Option values from the command line: JSON when it parses, else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_option_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``-o COMPONENT.KEY=VALUE``; COMPONENT is a component name or a role
    (backbone, objective, sampler, eval-sampler)."""
    data = copy.deepcopy(data)
    for item in overrides:
        target, eq, raw = item.partition("=")
        comp, dot, key = target.partition(".")
        if not eq or not dot or not key:
            raise SpecError(f"Option '{item}' is not of the form COMPONENT.KEY=VALUE (e.g. -o dgpo.beta_dpo=100).")
        refs = _refs_in(data)
        matches = [r for role, r in refs if role == comp or r.get("name") == comp]
        if not matches:
            names = sorted({r.get("name") for _, r in refs} | {role for role, _ in refs})
            raise SpecError(f"Option '{item}' names '{comp}', which is not a component of this run; "
                            f"use one of: {', '.join(n for n in names if n)}.")
        for ref in matches:
            ref.setdefault("options", {})[key] = parse_value(raw)
    return data


def _refs_in(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    refs = []
    for role in ("backbone", "objective", "sampler"):
        if isinstance(data.get(role), dict):
            refs.append((role, data[role]))
    ev = data.setdefault("eval", {})
    ev.setdefault("sampler", {"name": "ode-euler"})
    refs.append(("eval-sampler", ev["sampler"]))
    refs += [("reward", r) for r in data.get("rewards", [])]
    refs += [("eval-reward", r) for r in ev.get("rewards", [])]
    return refs
