"""From a user's settings to validated components, before any model is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .contracts import Backbone, Objective, Options, Reward, Sampler
from .errors import IncompatibleComponentsError
from .plugins import Components
from .spec import ComponentRef, RunSpec, apply_option_overrides, deep_merge, validate_spec


@dataclass
class Resolved:
    """A run whose components exist, whose options validate and whose pairings work."""

    spec: RunSpec
    backbone: tuple[type[Backbone], Options]
    objective: tuple[type[Objective], Options]
    sampler: tuple[type[Sampler], Options]
    eval_sampler: tuple[type[Sampler], Options]
    rewards: list[tuple[type[Reward], Options, float]]
    eval_rewards: list[tuple[type[Reward], Options]]
    world: str | None = None
    """The prompt world known before loading (None: no reward declares one, or one declares it at load)."""
    notes: list[str] = field(default_factory=list)

    def resolved_dict(self) -> dict[str, Any]:
        """The spec with every option filled in (what ``spec.resolved.json`` holds)."""
        d = self.spec.model_dump(mode="json")
        d["backbone"]["options"] = self.backbone[1].model_dump(mode="json")
        d["objective"]["options"] = self.objective[1].model_dump(mode="json")
        d["sampler"] = {"name": self.sampler[0].name, "options": self.sampler[1].model_dump(mode="json")}
        d["eval"]["sampler"]["options"] = self.eval_sampler[1].model_dump(mode="json")
        for ref, (_, opts, _) in zip(d["rewards"], self.rewards):
            ref["options"] = opts.model_dump(mode="json")
        for ref, (_, opts) in zip(d["eval"]["rewards"], self.eval_rewards):
            ref["options"] = opts.model_dump(mode="json")
        return d


def build_spec(comps: Components, user: dict[str, Any], overrides: list[str] = (),
               source: str = "the run settings") -> tuple[RunSpec, list[str]]:
    """Merge defaults < preset < user settings, then apply ``-o`` overrides."""
    notes = []
    defaults = RunSpec().model_dump(mode="json")
    merged = deep_merge(defaults, user)
    preset_name = merged.get("preset")
    if preset_name is None:
        auto = f"{merged['objective']['name']}-{merged['backbone']['name']}"
        if auto in comps.presets:
            preset_name = auto
            notes.append(f"applied preset '{auto}' (the default for this objective and backbone)")
    if preset_name:
        preset = comps.presets.get(preset_name)
        fragment = dict(preset.spec)
        # A preset never replaces a component the user chose; it only fills options beneath.
        for role in ("backbone", "objective", "sampler"):
            if role in user and role in fragment and fragment[role].get("name", user[role].get("name")) != user[role].get("name"):
                fragment.pop(role)
        merged = deep_merge(deep_merge(defaults, fragment), user)
        merged["preset"] = preset_name
    merged = apply_option_overrides(merged, list(overrides))
    return validate_spec(merged, source), notes


def resolve(comps: Components, spec: RunSpec, notes: list[str] | None = None) -> Resolved:
    """Look up classes, parse options and check capabilities; loads no model."""
    def get(kind: str, ref) -> tuple[type, Options]:
        cls = comps.by_kind(kind).get(ref.name)
        return cls, cls.parse_options(ref.options)

    backbone = get("backbone", spec.backbone)
    objective = get("objective", spec.objective)
    sampler_ref = spec.sampler or ComponentRef(name=objective[0].default_sampler)
    if spec.sampler is None:
        spec = spec.model_copy(update={"sampler": sampler_ref})
    sampler = get("sampler", sampler_ref)
    eval_sampler = get("sampler", spec.eval.sampler)
    rewards = [(*get("reward", r), r.weight) for r in spec.rewards]
    eval_rewards = [get("reward", r) for r in spec.eval.rewards]

    missing = objective[0].requires - sampler[0].provides
    if missing:
        need = ", ".join(sorted(missing))
        able = [e.name for e in comps.samplers if missing <= e.obj.provides]
        fix = f" (try --sampler {able[0]})" if able else " and no installed sampler does"
        raise IncompatibleComponentsError(
            f"Objective '{objective[0].name}' needs a sampler that provides {need}; "
            f"'{sampler[0].name}' does not{fix}."
        )
    if eval_sampler[0].requires:
        raise IncompatibleComponentsError(f"Sampler '{eval_sampler[0].name}' cannot evaluate: it requires "
                                          f"{sorted(eval_sampler[0].requires)}.")
    objective[0].check_sampler(objective[1], *sampler)
    # a reward that declares its world only once loaded is checked by the engine
    world = prompt_world([(cls.name, cls.world) for cls, _, _ in rewards if not cls.declared_at_load],
                         [(cls.name, cls.world) for cls, _ in eval_rewards if not cls.declared_at_load])
    unfilled = [split for split in ("train", "eval") if getattr(spec.prompts, split) is None]
    if world is None and unfilled and not any(cls.declared_at_load for cls, *_ in rewards + eval_rewards):
        notes = [*(notes or []), default_prompts_note(spec.backbone.name, unfilled)]
    return Resolved(spec, backbone, objective, sampler, eval_sampler, rewards, eval_rewards, world, notes or [])


def prompt_world(train: list[tuple[str, str | None]], evals: list[tuple[str, str | None]]) -> str | None:
    """The prompt world of the first reward (training, then evaluation) that has one; every other
    reward must score that world or none. Pairs are (reward name, world)."""
    first = next(((n, w) for n, w in train + evals if w is not None), None)
    if first is None:
        return None
    for name, w in train:
        if w not in (None, first[1]):
            raise IncompatibleComponentsError(f"Rewards '{first[0]}' and '{name}' score different prompt worlds "
                                              f"({first[1]} vs {w}); train on one world at a time.")
    for name, w in evals:
        if w not in (None, first[1]):
            raise IncompatibleComponentsError(
                f"Evaluation reward '{name}' scores the '{w}' world but the run trains on '{first[1]}' "
                "prompts; drop it from eval.rewards.")
    return first[1]


def default_prompts_note(backbone: str, splits: list[str]) -> str:
    """The note that says a run falls back to its backbone's prompts for ``splits``."""
    return f"no reward here ships prompts: using the default {' and '.join(splits)} prompts of backbone '{backbone}'"
