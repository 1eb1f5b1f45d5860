"""Two CPU processes (gloo, accelerate launch) reproduce a one-process run."""


import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TINY = ["--objective", "dgpo", "--reward", "ocr", "--steps", "2", "--group-size", "4", "--prompts-per-step", "2",
        "--eval-prompts", "4", "-o", "sampler.steps=4", "-o", "eval-sampler.steps=4",
        "-o", "nano.autocast=off"]


def _run(cmd, tmp_path):
    # CUDA hidden, so that on a one-GPU machine both processes stay on the CPU (gloo)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rollouts(run_dir):
    return [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("accelerate", path=str(BIN)) is None, reason="accelerate CLI not installed")
def test_two_processes_match_one(tmp_path):
    cfg = tmp_path / "spec.toml"
    cfg.write_text("log_samples = true\n[eval]\nbatch_size = 4\ngrid = 0\n")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(BIN / "dgpo-bench"), "run", *TINY, "--config", str(cfg), "--out", str(one)], tmp_path)
    # without CUDA, accelerate's multi-process launcher runs gloo on the CPU
    _run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", str(BIN / "dgpo-bench"), "run", *TINY,
          "--config", str(cfg), "--out", str(two)], tmp_path)
    r1, r2 = _rollouts(one), _rollouts(two)
    assert len(r1) == len(r2) == 2
    for a, b in zip(r1, r2):
        assert a["group_ids"] == b["group_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-6)
        assert a["advantages"] == pytest.approx(b["advantages"], abs=1e-5)
    res1 = json.loads((one / "result.json").read_text())
    res2 = json.loads((two / "result.json").read_text())
    assert res2["cost"]["processes"] == 2
    assert res1["cost"]["nfe"] == res2["cost"]["nfe"]
    assert res1["base"]["ocr"] == pytest.approx(res2["base"]["ocr"], abs=1e-6)
