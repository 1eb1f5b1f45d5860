"""Deterministic train/eval prompt sets of the procedural worlds, stored as JSONL.

Regenerate with ``python -m dgpo_bench_tasks.prompts`` (writes data/*.jsonl).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
WORLDS = ("text", "shapes")
SPLITS = ("train", "eval")
SIZES = {("text", "train"): 4096, ("text", "eval"): 1024,
         ("shapes", "train"): 4096, ("shapes", "eval"): 1024}
SEEDS = {("text", "train"): 11, ("text", "eval"): 12, ("shapes", "train"): 21, ("shapes", "eval"): 22}


def prompt_file(world: str, split: str) -> Path:
    return DATA_DIR / f"{world}_{split}.jsonl"


def make_prompts(world: str, split: str) -> list[dict]:
    n, seed = SIZES[(world, split)], SEEDS[(world, split)]
    if world == "text":
        from . import text

        return text.make_prompt_set(split, n, seed)
    if world == "shapes":
        from . import shapes

        return shapes.make_prompt_set(split, n, seed)
    raise ValueError(f"unknown world {world!r}")


def write_prompt_files(worlds=WORLDS) -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for w in worlds:
        for s in SPLITS:
            items = make_prompts(w, s)
            with open(prompt_file(w, s), "w") as f:
                for it in items:
                    f.write(json.dumps(it, sort_keys=True) + "\n")


@functools.lru_cache(maxsize=None)
def _load(world: str, split: str) -> tuple[str, ...]:
    if world not in WORLDS or split not in SPLITS:
        raise ValueError(f"unknown world/split {world!r}/{split!r}")
    return tuple(l for l in prompt_file(world, split).read_text().splitlines() if l.strip())


def load_prompts(world: str, split: str) -> list[dict]:
    """[{"prompt": str, "metadata": {"world": ..., ...}}, ...] (fresh copies)."""
    return [json.loads(l) for l in _load(world, split)]


if __name__ == "__main__":
    import sys

    write_prompt_files(tuple(sys.argv[1:]) or WORLDS)
