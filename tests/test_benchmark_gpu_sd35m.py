"""The GPU benchmark script's CPU paths: the refusal without CUDA and a --tiny run."""

import json

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(autouse=True)
def restore_threads():
    """--tiny sets one torch thread for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_script():
    return load_benchmark("gpu_sd35m")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(capsys):
    assert load_script().main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--tiny" in err and len(err.strip().splitlines()) == 1


def test_tiny_run_counts_the_passes_each_objective_needs(tmp_path):
    out = tmp_path / "figures.json"
    assert load_script().main(["--tiny", "--groups", "2", "--rollout-images", "2", "--json", str(out)]) == 0
    w = json.loads(out.read_text())["workloads"]
    n, m, k = 2 * 2, 4, 9  # samples (2 prompts x G 2), DGPO timesteps, Flow-GRPO transitions
    assert w["rollout"]["nfe"] == 2 * 10 * 2
    assert w["dgpo G=2"]["nfe"] == {"policy": 2 * n * m, "reference": n * m, "ema": n * m}
    assert w["flow-grpo G=2"]["nfe"] == {"policy": 2 * n * k, "reference": 2 * n * k, "ema": 0}
    assert all(row["seconds"] > 0 and row["flops"] > 0 for row in w.values())


@pytest.mark.slow  # compiling every shape the workloads use takes about 3 minutes on 2 cores
def test_tiny_run_compiled_with_a_pinned_attention_kernel(tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite runs eager (conftest.py)
    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    torch._dynamo.reset()
    out = tmp_path / "figures.json"
    args = ["--tiny", "--groups", "2", "--rollout-images", "2", "--compile", "--attention", "math", "--json", str(out)]
    assert load_script().main(args) == 0
    report = json.loads(out.read_text())
    assert report["compile"] is True and report["attention"] == "math" and report["compile_seconds"] > 0
    assert all(row["seconds"] > 0 for row in report["workloads"].values())
    torch._dynamo.reset()
