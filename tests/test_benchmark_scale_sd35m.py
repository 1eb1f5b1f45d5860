"""The scale benchmark's CPU paths: the refusal without CUDA and a --tiny run of DDP, FSDP2 and ZeRO-2 on 2 processes."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(capsys):
    assert load_benchmark("scale_sd35m").main([]) == 2
    err = capsys.readouterr().err
    assert "needs CUDA GPUs" in err and "--tiny" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate CLI not installed")
def test_tiny_run_measures_ddp_fsdp2_and_zero2_on_two_processes(tmp_path):
    out = tmp_path / "scale.json"
    assert load_benchmark("scale_sd35m").main(["--tiny", "--steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ddp"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert report["fsdp2"]["distributed_type"] == "DistributedType.FSDP"
    assert report["zero2"]["distributed_type"] == "DistributedType.DEEPSPEED"
    for r in report.values():
        assert r["processes"] == 2 and len(r["step_seconds"]) == 2 and all(s > 0 for s in r["step_seconds"])
        assert r["peak_gib_max"] > 0 and r["trainable_params"] == report["ddp"]["trainable_params"]
