"""Building components outside a training run (``dgpo-bench eval``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .building import backbone_prompts, given_prompts, load_backbone, load_rewards, prompt_source
from .contracts import Backbone, LoadContext, Prompt, Reward, Sampler
from .context import make_accelerator
from .errors import SpecError
from .plugins import Components
from .progress import ProgressReporter
from .resolve import default_prompts_note
from .results import SPEC_FILE
from .spec import apply_option_overrides


@dataclass
class EvalSession:
    backbone: Backbone
    sampler: Sampler
    rewards: dict[str, Reward]
    prompts: list[Prompt]
    accelerator: Any
    progress: ProgressReporter


def build_for_eval(comps: Components, run_dir: Path | None, backbone: str | None, rewards: list[dict[str, Any]],
                   sampler: str | None, n_prompts: int | None, overrides: list[str]) -> EvalSession:
    """Backbone (with a run's trained weights if given), eval sampler, rewards and prompts."""
    data: dict[str, Any] = {"backbone": {"name": backbone or "nano"}, "rewards": rewards,
                            "eval": {"sampler": {"name": sampler or "ode-euler"}, "prompts": n_prompts or 256}}
    if run_dir is not None:
        spec_path = Path(run_dir) / SPEC_FILE
        if not spec_path.is_file():
            raise SpecError(f"{run_dir} is not a run directory (no {SPEC_FILE}); pass the folder a run wrote.")
        run_spec = json.loads(spec_path.read_text())
        if backbone is None:
            data["backbone"] = run_spec["backbone"]
        if not rewards:
            data["rewards"] = [{"name": r["name"], "options": r.get("options", {})} for r in run_spec["rewards"]]
        else:
            _check_run_world(comps, run_dir, run_spec["rewards"], data["rewards"])
        if sampler is None:
            data["eval"]["sampler"] = run_spec["eval"]["sampler"]
        if n_prompts is None:
            data["eval"]["prompts"] = run_spec["eval"]["prompts"]
    if not data["rewards"]:
        raise SpecError("No reward to score; pass --reward NAME (e.g. --reward ocr).")
    data = apply_option_overrides(data, overrides)
    acc = make_accelerator()
    ctx = LoadContext(device=acc.device)
    reward_objs = load_rewards([(ref["name"], comps.rewards.get(ref["name"]), ref.get("options"))
                                for ref in data["rewards"]], ctx)
    source = prompt_source(reward_objs, list(reward_objs))
    progress = ProgressReporter()
    b_cls = comps.backbones.get(data["backbone"]["name"])
    s_cls = comps.samplers.get(data["eval"]["sampler"]["name"])
    smp = s_cls(data["eval"]["sampler"].get("options"))
    bb = load_backbone(b_cls, data["backbone"].get("options"), ctx, source)
    if run_dir is not None:
        weights = Path(run_dir) / "weights"
        if not weights.is_dir():
            raise SpecError(f"{run_dir} has no trained weights (weights/); the run did not finish.")
        bb.load_trainable(weights)
    if source is None:
        progress.log(f"[dim]{default_prompts_note(bb.name, ['eval'])}")
    prompts = given_prompts("eval", None, source)
    prompts = backbone_prompts(bb, "eval") if prompts is None else prompts
    return EvalSession(bb, smp, reward_objs, prompts[: data["eval"]["prompts"]], acc, progress)


def _check_run_world(comps: Components, run_dir: Path, trained: list[dict[str, Any]],
                     chosen: list[dict[str, Any]]) -> None:
    """Refuse rewards of another prompt world than the run trained in (its weights would not fit)."""
    def known(refs):  # (name, world) of installed rewards that declare their world before loading
        classes = [(ref["name"], comps.rewards.get(ref["name"])) for ref in refs if ref["name"] in comps.rewards]
        return [(name, cls.world) for name, cls in classes if not cls.declared_at_load and cls.world is not None]

    ran, asked = known(trained), known(chosen)
    if ran and asked and ran[0][1] != asked[0][1]:
        raise SpecError(f"{run_dir} was trained in the {ran[0][1]} world (reward '{ran[0][0]}') but reward "
                        f"'{asked[0][0]}' scores the {asked[0][1]} world; score it with a {ran[0][1]}-world "
                        f"reward (e.g. --reward {ran[0][0]}), or leave --reward out to use the run's own.")
