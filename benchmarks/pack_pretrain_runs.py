"""Pack pretraining runs for transfer: per run, its logs and at most two EMA checkpoints in
bf16 (the one scoring closest to 0.45, the middle of the wanted base range, and the best).

    python benchmarks/pack_pretrain_runs.py RUNS_DIR OUT_DIR
"""
import json
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def pick(records: list[dict]) -> list[int]:
    if not records:
        return []
    mid = min(records, key=lambda r: abs(r["eval_score"] - 0.45))["step"]
    best = max(records, key=lambda r: r["eval_score"])["step"]
    return sorted({mid, best})


def main(runs: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        log = run / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        with tarfile.open(out / f"{run.name}.tar", "w") as tar:
            for f in (run / "run.json", runs / f"{run.name}.log", log):
                if f.exists():
                    tar.add(f, arcname=f"{run.name}/{f.name}")
            steps = pick(records)
            for step in steps:
                ck = run / f"ckpt_{step:06d}"
                sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                      for k, v in load_file(str(ck / "model.safetensors")).items()}
                save_file(sd, str(ck / "model_bf16.safetensors"))
                tar.add(ck / "model_bf16.safetensors", arcname=f"{run.name}/{ck.name}/model.safetensors")
                for name in ("config.json", "samples.png"):
                    tar.add(ck / name, arcname=f"{run.name}/{ck.name}/{name}")
        best = max((r["eval_score"] for r in records), default=float("nan"))
        print(f"{run.name}: {len(records)} evals, last step {records[-1]['step'] if records else 0}, "
              f"best {best:.3f}, packed {steps}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
