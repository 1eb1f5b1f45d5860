"""Pieces every objective's step uses: micro-batches and diagnostics reduced over processes."""

from __future__ import annotations

import torch

from dgpo_bench.contracts import TrainContext


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of ``n`` samples, ``size`` at a time (None or 0: one slice)."""
    size = size or max(n, 1)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def reduce_metrics(ctx: TrainContext, values: dict[str, float], mins: tuple[str, ...] = (),
                   maxs: tuple[str, ...] = ()) -> dict[str, float]:
    """Average each metric over processes (minimum for ``mins``, maximum for ``maxs``)."""
    keys = list(values)
    local = torch.tensor([[float(values[k]) for k in keys]], dtype=torch.float64, device=ctx.accelerator.device)
    every = ctx.gather(local).cpu()
    out = {}
    for i, k in enumerate(keys):
        col = every[:, i]
        out[k] = float(col.min() if k in mins else col.max() if k in maxs else col.mean())
    return out


def velocity_mse(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over every non-batch dimension."""
    return (v.float() - target).square().flatten(1).mean(1)
