"""What a run and an evaluation both build: loaded rewards, their prompt world, the backbone, prompts.

``Engine.build`` (``run`` and every ``bench`` cell) and ``runtime.build_for_eval`` (``eval``) go
through these functions, so both check the loaded rewards' prompt world, load the backbone for
it and pick prompts the same way. The check on the classes, before anything loads, is
``resolve.prompt_world`` in ``resolve``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .contracts import Backbone, LoadContext, Prompt, Reward
from .errors import SpecError
from .resolve import prompt_world


def load_rewards(rewards: Sequence[tuple[str, type[Reward], Any]], ctx: LoadContext) -> dict[str, Reward]:
    """Build and load each named reward once (the first of a name wins), in order."""
    built: dict[str, Reward] = {}
    for name, cls, options in rewards:
        if name not in built:
            built[name] = cls(options)
    for reward in built.values():
        reward.load(ctx)
    return built


def prompt_source(rewards: dict[str, Reward], training: Sequence[str]) -> Reward | None:
    """The first loaded reward with a prompt world, after checking that every other reward scores that
    world or none (a reward that learns its world at load, like a remote one, is checked here)."""
    prompt_world([(n, rewards[n].world) for n in training],
                 [(n, r.world) for n, r in rewards.items() if n not in training])
    return next((r for r in rewards.values() if r.world is not None), None)


def load_backbone(cls: type[Backbone], options: Any, ctx: LoadContext, source: Reward | None) -> Backbone:
    """Build and load the backbone for the prompt world of ``source`` (None: the backbone's own)."""
    backbone = cls(options)
    backbone.load(LoadContext(device=ctx.device, world=source.world if source else None, seed=ctx.seed))
    return backbone


def given_prompts(split: str, path: str | None, source: Reward | None) -> list[Prompt] | None:
    """Prompts of ``split`` from its file, else the source reward's; None: take the backbone's defaults."""
    if path:
        return load_prompt_file(path)
    return None if source is None else source.prompts(split)


def backbone_prompts(backbone: Backbone, split: str) -> list[Prompt]:
    """The loaded backbone's default prompts for ``split``; refuses a backbone without any."""
    prompts = backbone.prompts(split)
    if not prompts:
        raise SpecError(f"No reward here ships prompts and backbone '{backbone.name}' has no default prompts; add a "
                        "reward that ships them (e.g. ocr) or, for a run, give prompts.train and prompts.eval files "
                        "in a --config file.")
    return prompts


def load_prompt_file(path: str) -> list[Prompt]:
    """Prompts from a .jsonl file ({"prompt", "metadata"} per line) or a text file (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"Prompt file {p} does not exist; check prompts.train / prompts.eval.")
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    if p.suffix == ".jsonl":
        try:
            rows = [json.loads(ln) for ln in lines]
            return [Prompt(r["prompt"], r.get("metadata", {})) for r in rows]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SpecError(f"Prompt file {p} must hold one JSON object with a 'prompt' key per line.") from None
    return [Prompt(ln.strip()) for ln in lines]
