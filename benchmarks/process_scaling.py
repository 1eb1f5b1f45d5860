"""Training throughput of 1 vs 2 CPU processes at one thread each (DDP over gloo), not a test.

    python benchmarks/process_scaling.py [--steps 2] [--json]

Runs the main command's step shape (DGPO, 16 x 8 = 128 images per optimizer step, the
dgpo-nano preset) for ``--steps`` optimizer steps, once in one process and once through
``accelerate launch --multi_gpu --num_processes 2`` with CUDA hidden, side by side in one
invocation. Evaluation is cut to one held-out prompt, since only training is compared.
Prints each run's training images per second (images / seconds of the rollout, reward and
train phases, from result.json) and their ratio (goal >= 1.8; ideal 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def run(processes: int, steps: int, out: Path) -> dict:
    cmd = [str(BIN / "dgpo-bench"), "run", "--objective", "dgpo", "--reward", "ocr", "--steps", str(steps),
           "--eval-prompts", "1", "--out", str(out)]
    if processes > 1:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--mixed_precision", "no", "--dynamo_backend", "no", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    cost = json.loads((out / "result.json").read_text())["cost"]
    seconds = cost["train_seconds"]
    return {"processes": processes, "images": cost["images"], "train_seconds": round(seconds, 2),
            "images_per_second": round(cost["images"] / seconds, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, two = (run(p, args.steps, Path(tmp) / f"p{p}") for p in (1, 2))
    report = {"one": one, "two": two, "speedup": round(two["images_per_second"] / one["images_per_second"], 3)}
    if args.json:
        print(json.dumps(report))
    else:
        for r in (one, two):
            print(f"{r['processes']} process(es) x 1 thread: {r['images']} images in {r['train_seconds']} s "
                  f"= {r['images_per_second']} images/s")
        print(f"speedup {report['speedup']} (goal >= 1.8, ideal 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
