"""Cost meters owned by the engine: wall-clock per phase, model evaluations, images."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict
from typing import Iterator

import torch

PHASES = ("rollout", "reward", "train", "eval", "compile")
UNCHARGED = ("eval", "compile")
"""Phases that no method's training budget pays: evaluation, and torch.compile's warm-up."""
ROLES = ("policy", "reference", "ema")


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (frames and backward graphs)."""
    utils = sys.modules.get("torch._dynamo.utils")  # never imported: nothing was compiled
    spent = getattr(utils, "cumulative_time_spent_ns", None) or {}
    return (spent.get("entire_frame_compile", 0) + spent.get("entire_backward_compile", 0)) / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class CostMeter:
    """Counts what a run spends; every backbone evaluation is charged here.

    ``nfe`` counts single-sample forward passes of the denoiser by weight role
    (a CFG evaluation of one sample counts two). Eval-phase costs are kept apart
    from training costs so budgets and time-to-target use training spend only; the
    seconds torch.compile spends compiling inside any phase move to the 'compile' phase.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.nfe: dict[str, int] = defaultdict(int)
        self.eval_nfe = 0
        self.images = 0
        self.reward_calls = 0
        self.optimizer_steps = 0
        self._phase: str | None = None
        self._start = time.perf_counter()
        self._compiled = compile_seconds()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, self._phase = self._phase, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            now = compile_seconds()
            compiling, self._compiled = min(now - self._compiled, elapsed), now
            self.seconds[name] += elapsed - compiling
            self.seconds["compile"] += compiling
            self._phase = outer

    @property
    def current_phase(self) -> str | None:
        """The phase being timed now (None outside any)."""
        return self._phase

    def add_nfe(self, role: str, n: int) -> None:
        if self._phase == "eval":
            self.eval_nfe += n
        else:
            self.nfe[role] += n

    @property
    def train_seconds(self) -> float:
        """Wall-clock spent on everything but evaluation and compilation."""
        return sum(v for k, v in self.seconds.items() if k not in UNCHARGED)

    def restore(self, snap: dict) -> None:
        """Continue counting from a ``snapshot`` (resume after a checkpoint)."""
        self.seconds.update(snap.get("seconds", {}))
        self.nfe.update(snap.get("nfe", {}))
        self.eval_nfe = snap.get("eval_nfe", 0)
        self.images = snap.get("images", 0)
        self.reward_calls = snap.get("reward_calls", 0)
        self.optimizer_steps = snap.get("optimizer_steps", 0)
        self._start = time.perf_counter() - snap.get("wall_seconds", 0.0)

    def snapshot(self) -> dict:
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        return {
            "wall_seconds": round(time.perf_counter() - self._start, 3),
            "train_seconds": round(self.train_seconds, 3),
            "seconds": {k: round(self.seconds.get(k, 0.0), 3) for k in PHASES},
            "nfe": {k: self.nfe.get(k, 0) for k in ROLES},
            "nfe_total": sum(self.nfe.values()),
            "eval_nfe": self.eval_nfe,
            "images": self.images,
            "reward_calls": self.reward_calls,
            "optimizer_steps": self.optimizer_steps,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(peak_gpu, 1),
        }
