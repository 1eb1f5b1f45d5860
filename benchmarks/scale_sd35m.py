"""Step time and peak memory of DGPO updates under DDP, FSDP2 and DeepSpeed ZeRO-2 on an SD3.5-Medium-sized MM-DiT.

    python benchmarks/scale_sd35m.py --processes 8 [--steps 5] [--lora-rank 0] [--json scale.json]
    python benchmarks/scale_sd35m.py --tiny        # 2 CPU processes (gloo) and a tiny transformer: every code path

For each strategy the script launches itself with ``accelerate launch`` (DDP: ``--multi_gpu``;
FSDP2: ``--config_file configs/accelerate/fsdp2_8gpu.yaml``; ZeRO-2:
``--config_file configs/accelerate/zero2_8gpu.yaml``) and runs ``--steps`` optimizer
updates of the real ``dgpo`` objective through the engine's context (``accelerator.prepare``,
gradients kept local until each update's last pass, clipping and the step) on the random-weight
transformer of ``gpu_sd35m.py`` (bf16 weights, full fine-tuning by default, since sharding is
for that; ``--lora-rank 64`` for LoRA). Each process holds ``--prompts`` groups of ``--group``
synthetic latents. Prints, per strategy, the median seconds of an update (after the first,
which includes warm-up) and the peak memory of the busiest process (GPU: allocated; CPU: RSS).
On a CPU, FSDP2 is reached through ``dgpo_bench.testing.force_fsdp2_on_cpu`` (accelerate maps
a CPU run to DDP); DeepSpeed runs its CPU accelerator under gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STRATEGIES = ("ddp", "fsdp2", "zero2")
CONFIGS = {"fsdp2": "fsdp2_8gpu.yaml", "zero2": "zero2_8gpu.yaml"}


def launch_flags(strategy: str, processes: int) -> list[str]:
    if strategy == "ddp":
        return ["--multi_gpu", "--num_processes", str(processes)]
    return ["--config_file", str(HERE.parent / "configs" / "accelerate" / CONFIGS[strategy]),
            "--num_processes", str(processes)]


def worker(args: argparse.Namespace) -> None:
    """One process of one strategy: build the backbone and DGPO, time ``args.steps`` updates."""
    sys.path.insert(0, str(HERE))
    if args.tiny:
        torch.set_num_threads(1)
        if args.worker == "fsdp2":
            from dgpo_bench.testing import force_fsdp2_on_cpu

            force_fsdp2_on_cpu()
    from gpu_sd35m import SD35_MEDIUM, TINY, RandomMMDiT, sigma_grid

    from dgpo_bench.context import EngineContext, make_accelerator
    from dgpo_bench.contracts import LoadContext, Prompt, RolloutBatch
    from dgpo_bench.meters import peak_rss_mb
    from dgpo_bench_objectives.dgpo import Dgpo

    acc = make_accelerator()
    bb = RandomMMDiT(TINY if args.tiny else SD35_MEDIUM, 16 if args.tiny else 77 + 128, args.resolution,
                     {"dtype": "fp32" if args.tiny else "bf16", "lora_rank": args.lora_rank,
                      "lora_alpha": 2 * args.lora_rank, "gradient_checkpointing": not args.tiny})
    bb.load(LoadContext(device=acc.device, seed=0))
    objective = Dgpo({"micro_batch_size": args.micro_batch, "ema_rollout_after": None})
    groups = args.prompts * acc.num_processes
    ctx = EngineContext(bb, None, acc, objective.options, seed=0, group_size=args.group, num_groups=groups)
    objective.setup(ctx)
    n, rank = args.prompts * args.group, acc.process_index
    gen = torch.Generator().manual_seed(rank)
    texts = [f"prompt {g}" for g in range(rank * args.prompts, (rank + 1) * args.prompts) for _ in range(args.group)]
    ids = torch.arange(rank * n, (rank + 1) * n)
    rewards_all = torch.rand(groups * args.group, generator=torch.Generator().manual_seed(0))
    batch = RolloutBatch(prompts=[Prompt(t) for t in texts], cond=bb.encode_prompts(texts),
                         noise=torch.randn(n, *bb.latent_shape, generator=gen).to(acc.device, bb.dtype),
                         latents=torch.randn(n, *bb.latent_shape, generator=gen).to(acc.device, bb.dtype),
                         sigmas=sigma_grid(10).to(acc.device), group_ids=ids // args.group, rewards=rewards_all[ids],
                         guidance_scale=1.0, sample_ids=ids, rollout_rewards=rewards_all,
                         rollout_group_ids=torch.arange(groups * args.group) // args.group)
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(acc.device)
    seconds = []
    for step in range(args.steps):
        ctx.step = step
        if cuda:
            torch.cuda.synchronize(acc.device)
        t0 = time.perf_counter()
        bb.train(True)
        ctx.update(objective, batch)
        if cuda:
            torch.cuda.synchronize(acc.device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(acc.device) / 2**30 if cuda else peak_rss_mb() / 1024
    peaks = acc.gather(torch.tensor([peak], device=acc.device)).tolist()
    if acc.is_main_process:
        Path(args.out).write_text(json.dumps({
            "strategy": args.worker, "processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
            "samples_per_process": n, "step_seconds": [round(s, 4) for s in seconds],
            "median_step_seconds": round(statistics.median(seconds[1:] or seconds), 4),
            "peak_gib_max": round(max(peaks), 3), "peak_kind": "cuda allocated" if cuda else "rss",
            "trainable_params": sum(p.numel() for p in bb.trainable_parameters())}))
    acc.wait_for_everyone()
    acc.end_training()


def run_strategy(strategy: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *launch_flags(strategy, args.processes),
           "--mixed_precision", "no" if args.tiny else "bf16", "--dynamo_backend", "no", str(Path(__file__).resolve()),
           "--worker", strategy, "--out", str(out), *args.passthrough]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.tiny:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{strategy} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny transformer on 2 CPU processes (proves the code paths)")
    p.add_argument("--processes", type=int, help="processes per strategy (default: 8 GPUs; tiny: 2)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=1, help="groups per process")
    p.add_argument("--group", type=int, help="samples per group (default 16; tiny 2)")
    p.add_argument("--micro-batch", type=int, help="samples per backward pass (default 4; tiny 2)")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--resolution", type=int, help="image side (default 512; tiny 64)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.processes = args.processes or (2 if args.tiny else 8)
    args.group = args.group or (2 if args.tiny else 16)
    args.micro_batch = args.micro_batch or (2 if args.tiny else 4)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.passthrough = [*(["--tiny"] if args.tiny else []), "--steps", str(args.steps), "--prompts", str(args.prompts),
                        "--group", str(args.group), "--micro-batch", str(args.micro_batch),
                        "--lora-rank", str(args.lora_rank), "--resolution", str(args.resolution)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.tiny and not torch.cuda.is_available():
        print("scale_sd35m.py needs CUDA GPUs; use --tiny on a CPU machine (2 gloo processes, tiny model).",
              file=sys.stderr)
        return 2
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            r = run_strategy(strategy, args, Path(tmp) / f"{strategy}.json")
            report[strategy] = r
            print(f"{strategy:6s} x{r['processes']} ({r['distributed_type']}): update {r['median_step_seconds']} s "
                  f"(median of {len(r['step_seconds']) - 1 or 1}), peak {r['peak_gib_max']} GiB {r['peak_kind']}, "
                  f"{r['trainable_params']:,} trainable parameters")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
