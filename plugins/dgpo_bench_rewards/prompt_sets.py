"""The train and held-out prompt sets of the procedural worlds, as ``Prompt`` objects."""

from __future__ import annotations

from dgpo_bench.contracts import Prompt
from dgpo_bench.errors import SpecError


def world_prompts(world: str, split: str) -> list[Prompt]:
    """Prompts of ``world`` ('text' or 'shapes') for ``split`` ('train' or 'eval')."""
    from dgpo_bench_tasks import load_prompts

    if split not in ("train", "eval"):
        raise SpecError(f"Unknown prompt split '{split}'; use 'train' or 'eval'.")
    return [Prompt(item["prompt"], item["metadata"]) for item in load_prompts(world, split)]
