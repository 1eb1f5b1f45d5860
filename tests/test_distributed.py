"""Two CPU processes (gloo) and two "nodes" on one machine, through accelerate launch and the engine's
prepared module, reproduce a one-process run."""


import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
TINY = ["--reward", "ocr", "--steps", "3", "--group-size", "4", "--prompts-per-step", "2", "--eval-prompts", "1",
        "-o", "sampler.steps=4", "-o", "eval-sampler.steps=4", "-o", "nano.autocast=off"]
SPEC = {"dgpo": "", "flow-grpo": "updates_per_rollout = 2\n"}
"""Flow-GRPO deals each rollout into two updates, the second off-policy. One held-out prompt:
the second process evaluates nothing, so evaluation forwards must not be collectives."""
LOSSES = {"dgpo": ("pref_loss", "kl", "grad_norm"), "flow-grpo": ("policy_loss", "kl", "ratio_min", "grad_norm")}
LAUNCH = ["--mixed_precision", "no", "--dynamo_backend", "no"]
needs_launcher = pytest.mark.skipif(shutil.which("accelerate", path=str(BIN)) is None,
                                    reason="accelerate CLI not installed")
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def _env():
    # CUDA hidden, so that on a GPU machine every process stays on the CPU (gloo)
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def _run_args(objective, tmp, out, extra=""):
    cfg = tmp / f"{objective}.toml"
    cfg.write_text(SPEC[objective] + extra + "log_samples = true\n[eval]\nbatch_size = 4\ngrid = 0\n"
                   "[eval.ema]\ndecay = 0.9\nevery = 1\n")  # the exported weights are the evaluation EMA
    return ["run", "--objective", objective, *TINY, "--config", str(cfg), "--out", str(out)]


def _check(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One-process runs of each objective, made once for the module."""
    made = {}

    def get(objective):
        if objective not in made:
            tmp = tmp_path_factory.mktemp(f"one-{objective}")
            _check(subprocess.run([str(BIN / "dgpo-bench"), *_run_args(objective, tmp, tmp / "run")],
                                  capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp))
            made[objective] = tmp / "run"
        return made[objective]
    return get


def _records(run_dir, name):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _weights(run_dir):
    return load_file(str(run_dir / "weights" / "transformer" / "diffusion_pytorch_model.safetensors"))


def assert_same_run(one, many, objective, processes, rel=1e-4):
    r1, r2 = _records(one, "rollouts.jsonl"), _records(many, "rollouts.jsonl")
    assert len(r1) == len(r2) == 3
    for a, b in zip(r1, r2):
        assert a["group_ids"] == b["group_ids"]
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-6)
        assert a["advantages"] == pytest.approx(b["advantages"], abs=1e-5)
    t1 = [r for r in _records(one, "metrics.jsonl") if r["type"] == "train"]
    t2 = [r for r in _records(many, "metrics.jsonl") if r["type"] == "train"]
    for a, b in zip(t1, t2):
        for key in LOSSES[objective]:
            assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=rel, abs=1e-7), (a["step"], key)
    res1, res2 = (json.loads((d / "result.json").read_text()) for d in (one, many))
    assert res2["cost"]["processes"] == processes
    assert res1["cost"]["nfe"] == res2["cost"]["nfe"]
    assert res1["cost"]["optimizer_steps"] == res2["cost"]["optimizer_steps"] == 3
    assert res1["base"]["ocr"] == pytest.approx(res2["base"]["ocr"], abs=1e-6)
    assert res1["tuned"]["ocr"] == pytest.approx(res2["tuned"]["ocr"], abs=1e-6)
    w1, w2 = _weights(one), _weights(many)
    assert w1.keys() == w2.keys()
    base = _base_weights()
    step = torch.cat([(w1[k] - base[k]).flatten() for k in w1]).abs()
    diff = torch.cat([(w2[k] - w1[k]).flatten() for k in w1]).abs()
    # Adam divides by sqrt(v): on near-zero gradients the reduction order's rounding moves a few
    # weights by up to a tenth of the largest step (one weight, the same under DDP, FSDP2 and ZeRO-2:
    # 0.049 on this AVX2 machine kind); everywhere else the runs agree to rounding
    assert step.max() > 0 and diff.max() <= 0.1 * step.max()
    assert diff.mean() <= 1e-3 * step.mean()


def _base_weights():
    from dgpo_bench_backbones.nano.model import default_weights_dir

    state = load_file(str(default_weights_dir("text") / "model.safetensors"))
    return {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}


@needs_launcher
@pytest.mark.parametrize("objective", ["dgpo", "flow-grpo"])
def test_two_processes_match_one(objective, one_process, tmp_path):
    # without CUDA, accelerate's multi-process launcher runs gloo on the CPU
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", *LAUNCH,
           "--main_process_port", str(_free_port()), str(BIN / "dgpo-bench"),
           *_run_args(objective, tmp_path, tmp_path / "two")]
    _check(subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path))
    assert_same_run(one_process(objective), tmp_path / "two", objective, 2)


@needs_launcher
def test_two_nodes_match_one_process(one_process, tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
                               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                               "--main_process_port", port, *LAUNCH, str(BIN / "dgpo-bench"),
                               *_run_args("flow-grpo", tmp_path, tmp_path / "nodes")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert_same_run(one_process("flow-grpo"), tmp_path / "nodes", "flow-grpo", 2)


@needs_launcher
@pytest.mark.parametrize("objective", ["dgpo", "flow-grpo"])
def test_fsdp2_two_processes_match_one_and_resume_exactly(objective, one_process, tmp_path):
    """The sharded path on a CPU (see tests/fsdp2_launch.py), launched with the shipped FSDP2 config (one
    shard unit per MM-DiT block) on 2 processes: sharded weights, a per-shard fast EMA and gathered
    checkpoints, interrupted after step 2's checkpoint and resumed, reproduce one unsharded process."""
    config = CONFIGS / "fsdp2_8gpu.yaml"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2", *LAUNCH,
           "--main_process_port", str(_free_port()), str(Path(__file__).with_name("fsdp2_launch.py")),
           *_run_args(objective, tmp_path, tmp_path / "fsdp", extra="checkpoint_every = 2\n")]
    stopped = subprocess.run(cmd, capture_output=True, text=True, env=dict(_env(), STOP_AFTER_CHECKPOINT="2"),
                             timeout=600, cwd=tmp_path)
    assert stopped.returncode != 0 and (tmp_path / "fsdp" / "checkpoint" / "engine.json").is_file(), \
        stopped.stderr[-3000:]
    assert not (tmp_path / "fsdp" / "result.json").exists()
    _check(subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path))
    # FSDP2 reduce-scatters gradients in another order than one process sums them, and Adam's division
    # by sqrt(v) carries that rounding into later steps: losses agree to 1e-3 (DDP: 1e-4) by step 3
    assert_same_run(one_process(objective), tmp_path / "fsdp", objective, 2, rel=1e-3)


@needs_launcher
def test_fsdp2_with_lora_matches_one_process(tmp_path):
    """LoRA under FSDP2 (the reference is the sharded transformer with its adapters disabled): the exported
    diffusers LoRA file of 2 sharded processes matches one process's."""
    lora = ["-o", "nano.lora_rank=4"]
    one = tmp_path / "one"
    _check(subprocess.run([str(BIN / "dgpo-bench"), *_run_args("dgpo", tmp_path, one), *lora], capture_output=True,
                          text=True, env=_env(), timeout=600, cwd=tmp_path))
    config = CONFIGS / "fsdp2_8gpu.yaml"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2", *LAUNCH,
           "--main_process_port", str(_free_port()), str(Path(__file__).with_name("fsdp2_launch.py")),
           *_run_args("dgpo", tmp_path, tmp_path / "fsdp"), *lora]
    _check(subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path))
    a, b = (load_file(str(d / "weights" / "pytorch_lora_weights.safetensors")) for d in (one, tmp_path / "fsdp"))
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    step = max(a[k].abs().max() for k in a if ".lora_B." in k)  # B starts at zero: its size is the training
    assert step > 0 and max((a[k] - b[k]).abs().max() for k in a) <= 0.05 * step
    r1, r2 = (json.loads((d / "result.json").read_text()) for d in (one, tmp_path / "fsdp"))
    assert r1["cost"]["nfe"] == r2["cost"]["nfe"] and r1["tuned"]["ocr"] == pytest.approx(r2["tuned"]["ocr"], abs=1e-6)


@needs_launcher
@pytest.mark.parametrize("objective", ["dgpo", "flow-grpo"])
def test_deepspeed_zero2_two_processes_match_one_and_resume_exactly(objective, one_process, tmp_path):
    """DeepSpeed ZeRO-2 with the shipped config on 2 CPU processes (accelerate's own DeepSpeed path, gloo):
    partitioned optimizer state, DeepSpeed's clipping and step at the update's last pass, and the
    gathered partitions in the checkpoint; interrupted after step 2's checkpoint and resumed, it
    reproduces one process."""
    pytest.importorskip("deepspeed")
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "zero2_8gpu.yaml"), "--num_processes",
           "2", *LAUNCH, "--main_process_port", str(_free_port()), str(Path(__file__).with_name("cli_launch.py")),
           *_run_args(objective, tmp_path, tmp_path / "zero2", extra="checkpoint_every = 2\n")]
    stopped = subprocess.run(cmd, capture_output=True, text=True, env=dict(_env(), STOP_AFTER_CHECKPOINT="2"),
                             timeout=600, cwd=tmp_path)
    assert stopped.returncode != 0 and (tmp_path / "zero2" / "checkpoint" / "engine.json").is_file(), \
        stopped.stderr[-3000:]
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    _check(resumed)
    assert "eval base" not in resumed.stderr and "eval final (step 3)" in resumed.stderr  # resumed, not restarted
    assert_same_run(one_process(objective), tmp_path / "zero2", objective, 2)
