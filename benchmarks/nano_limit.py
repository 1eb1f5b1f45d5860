"""The main command's work on the nano model against this machine's measured limit, eager vs compiled.

    python benchmarks/nano_limit.py [--compile both|on|off] [--steps 2] [--repeats 3] [--threads 2] [--json]

In one process, for each of eager and compiled nano (``-o nano.compile=off|on``), through the
engine and the main command's spec (``dgpo-nano``: DPM-Solver++ 10 steps with CFG, 8 prompts x 16):

- ``group_seconds``: one 16-image group, best of ``--repeats`` after a warm-up call;
- ``train_step_seconds``: one DGPO step of 8 x 16 (rollout, reward, update), best of ``--steps``
  after one warm-up step, and its parts;
- ``compile_seconds``: what torch.compile spent in the warm-up (the run's 'compile' phase).

FLOPs of a group and of an update are counted once with ``torch.utils.flop_counter.FlopCounterMode``
(eager). GEMM rates are measured in the same process, in fp32 and bf16: at a large square size and at
the model's own matmul shapes (every GEMM of a group, weighted by its FLOPs); bf16 only where the
CPU has native bf16 (emulated, one large product takes minutes). ``fraction_of_peak``
is the achieved rate over the model-shape GEMM rate in the dtype the model computes in (bf16 under
autocast, else fp32); ``fraction_of_large_gemm`` is the same over the large-square rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dgpo_bench.results import cpu_info

LARGE = 2048
GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten.baddbmm.default}


class GemmShapes(TorchDispatchMode):
    """Counts the (batch, m, k, n) of every matrix product dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            a, b = (args[1], args[2]) if func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) \
                else (args[0], args[1])
            batch = a.shape[0] if a.ndim == 3 else 1
            self.shapes[(batch, a.shape[-2], a.shape[-1], b.shape[-1])] += 1
        return func(*args, **(kwargs or {}))


def gemm_gflops(shape: tuple[int, int, int, int], dtype: torch.dtype, min_seconds: float = 0.2) -> float:
    """Measured GFLOP/s of one (batch, m, k, n) product in ``dtype``."""
    batch, m, k, n = shape
    a, b = torch.randn(batch, m, k, dtype=dtype), torch.randn(batch, k, n, dtype=dtype)
    mm = (lambda: torch.mm(a[0], b[0])) if batch == 1 else (lambda: torch.bmm(a, b))
    mm()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        mm()
        calls += 1
    return 2 * batch * m * k * n * calls / (time.perf_counter() - t0) / 1e9


def model_gemm_gflops(shapes: Counter, dtype: torch.dtype) -> float:
    """The FLOP-weighted rate of a forward's GEMMs in ``dtype``: their FLOPs over their measured time."""
    flops = {s: 2 * s[0] * s[1] * s[2] * s[3] * count for s, count in shapes.items()}
    seconds = sum(f / (gemm_gflops(s, dtype) * 1e9) for s, f in flops.items())
    return sum(flops.values()) / seconds / 1e9


def build_engine(compile_mode: str, run_dir: str, group: int, prompts: int, weights: str | None):
    from dgpo_bench.engine import Engine
    from dgpo_bench.plugins import get_plugin_manager, load_components
    from dgpo_bench.resolve import build_spec, resolve

    comps = load_components(get_plugin_manager())
    spec, notes = build_spec(comps, {"objective": {"name": "dgpo"}, "rewards": [{"name": "ocr"}], "seed": 0,
                                     "group_size": group, "prompts_per_step": prompts, "eval": {"prompts": 1}},
                             [f"nano.compile={compile_mode}", *([f"nano.weights={weights}"] if weights else [])])
    engine = Engine(resolve(comps, spec, notes), run_dir=run_dir, progress=False)
    engine.build()
    return engine


def group_inputs(engine, group: int):
    from dgpo_bench.contracts import SampleNoise

    bb = engine.backbone
    cond = bb.encode_prompts([p.text for p in engine.train_prompts[:group]])
    return cond, SampleNoise(range(group), bb.device).randn(bb.latent_shape, bb.dtype)


def time_group(engine, group: int, repeats: int) -> tuple[float, float]:
    """(first call's seconds, best of ``repeats``) of sampling one group of ``group`` images."""
    cond, noise = group_inputs(engine, group)
    with torch.no_grad(), engine.meter.phase("rollout"):
        engine.backbone.train(False)
        runs = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            engine.sampler.sample(engine.backbone, cond, noise)
            runs.append(time.perf_counter() - t0)
    return runs[0], min(runs[1:])


def one_step(engine, step: int) -> dict[str, float]:
    """Seconds of each phase of DGPO step ``step`` (rollout, reward, update) through the engine."""
    before = dict(engine.meter.seconds)
    engine.ctx.step = step
    batches, _ = engine.rollout(step)
    with engine.meter.phase("train"):
        engine.backbone.train(True)
        engine.ctx.update(engine.objective, batches[0])
    spent = {k: engine.meter.seconds[k] - before.get(k, 0.0) for k in ("rollout", "reward", "train", "compile")}
    return {"rollout": spent["rollout"], "reward": spent["reward"], "update": spent["train"],
            "compile": spent["compile"], "total": spent["rollout"] + spent["reward"] + spent["train"]}


def count_flops(engine, group: int) -> tuple[float, float, Counter]:
    """(GFLOP of a group, GFLOP of a DGPO update, the group's GEMM shapes), counted eagerly."""
    with torch.compiler.set_stance("force_eager"):
        cond, noise = group_inputs(engine, group)
        engine.backbone.train(False)
        shapes = GemmShapes()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            with shapes:
                engine.sampler.sample(engine.backbone, cond, noise)
        group_flops = counter.get_total_flops()
        batches, _ = engine.rollout(10_000)
        engine.backbone.train(True)
        with FlopCounterMode(display=False) as counter:
            engine.ctx.update(engine.objective, batches[0])
    return group_flops / 1e9, counter.get_total_flops() / 1e9, shapes.shapes


def measure(mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(mode, tmp, args.group, args.prompts, args.weights)
        first, group = time_group(engine, args.group, args.repeats)
        warm = one_step(engine, 0)
        steps = [one_step(engine, s) for s in range(1, args.steps + 1)]
        best = min(steps, key=lambda s: s["total"])
        return {"mode": mode, "group_seconds": group, "group_first_call_seconds": first,
                "train_step_seconds": best["total"], "step_parts_seconds": {k: best[k] for k in
                                                                          ("rollout", "reward", "update")},
                "warmup_step_seconds": warm["total"] + warm["compile"],
                "compile_seconds": engine.meter.seconds["compile"], "engine": engine}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", choices=("both", "on", "off"), default="both")
    p.add_argument("--group", type=int, default=16, help="images per group (the main command: 16)")
    p.add_argument("--prompts", type=int, default=8, help="groups per DGPO step (the main command: 8)")
    p.add_argument("--steps", type=int, default=2, help="timed DGPO steps after a warm-up step")
    p.add_argument("--repeats", type=int, default=3, help="timed groups after a warm-up group")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", help="a nano checkpoint folder instead of the shipped text model")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ["off", "on"] if args.compile == "both" else [args.compile]
    runs = [measure(m, args) for m in modes]
    engine = runs[0].pop("engine")
    for r in runs[1:]:
        r.pop("engine")
    group_gflop, update_gflop, shapes = count_flops(engine, args.group)
    autocast = engine.backbone._autocast
    compute = torch.bfloat16 if autocast else torch.float32
    peak = {"fp32_large": gemm_gflops((1, LARGE, LARGE, LARGE), torch.float32),
            "fp32_model": model_gemm_gflops(shapes, torch.float32)}
    native = cpu_info()["native_bf16"] or engine.backbone.device.type == "cuda"
    peak.update({"bf16_large": gemm_gflops((1, LARGE, LARGE, LARGE), torch.bfloat16),  # emulated: minutes a call
                 "bf16_model": model_gemm_gflops(shapes, torch.bfloat16)} if native else
                {"bf16_large": None, "bf16_model": None})
    name = "bf16" if autocast else "fp32"
    for r in runs:
        r["achieved_gflops"] = {"group": group_gflop / r["group_seconds"],
                                "update": update_gflop / r["step_parts_seconds"]["update"]}
        r["fraction_of_peak"] = {k: v / peak[f"{name}_model"] for k, v in r["achieved_gflops"].items()}
        r["fraction_of_large_gemm"] = {k: v / peak[f"{name}_large"] for k, v in r["achieved_gflops"].items()}
    report = {"threads": args.threads, "cpu": cpu_info(), "torch": torch.__version__, "compute_dtype": name,
              "group": args.group, "step_images": args.group * args.prompts,
              "group_gflop": group_gflop, "update_gflop": update_gflop, "gemm_peak_gflops": peak,
              "model_gemm_shapes": len(shapes), "runs": runs}
    top = runs[-1]  # the flat keys describe the last mode measured (compiled, with --compile both)
    report.update({k: top[k] for k in ("group_seconds", "train_step_seconds", "achieved_gflops", "fraction_of_peak")})
    if len(runs) == 2:
        report["speedup"] = {"group": runs[0]["group_seconds"] / runs[1]["group_seconds"],
                             "train_step": runs[0]["train_step_seconds"] / runs[1]["train_step_seconds"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.threads} threads, {report['cpu']['name']} (native bf16 {report['cpu']['native_bf16']}), torch "
          f"{torch.__version__}, model computes in {name}")
    bf16 = (f"bf16 {peak['bf16_large']:.0f} and {peak['bf16_model']:.0f}" if peak["bf16_model"] else
            "bf16 not measured (this CPU has no native bf16)")
    print(f"GEMM GFLOP/s measured here: fp32 {peak['fp32_large']:.0f} at {LARGE}^3, {peak['fp32_model']:.0f} at the "
          f"model's {len(shapes)} shapes; {bf16}")
    print(f"FLOPs: a group of {args.group} {group_gflop:.1f} GFLOP, a DGPO update of {args.group * args.prompts} "
          f"{update_gflop:.1f} GFLOP\n")
    print("| nano.compile | group s | group GFLOP/s | of peak | DGPO step s (rollout/reward/update) "
          "| update GFLOP/s | of peak | compile s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in runs:
        parts = "/".join(f"{v:.1f}" for v in r["step_parts_seconds"].values())
        print(f"| {r['mode']} | {r['group_seconds']:.3f} | {r['achieved_gflops']['group']:.0f} "
              f"| {r['fraction_of_peak']['group']:.2f} | {r['train_step_seconds']:.2f} ({parts}) "
              f"| {r['achieved_gflops']['update']:.0f} | {r['fraction_of_peak']['update']:.2f} "
              f"| {r['compile_seconds']:.0f} |")
    if "speedup" in report:
        print(f"\ncompiled / eager: group {report['speedup']['group']:.2f}x, "
              f"DGPO step {report['speedup']['train_step']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
