"""benchmarks/nano_limit.py measures a group and a DGPO step through the engine against measured GEMM rates."""

import json

import pytest
import torch

from conftest import load_benchmark


def test_json_figures_are_consistent(tiny_weights, capsys):
    threads = torch.get_num_threads()
    code = load_benchmark("nano_limit").main(["--compile", "off", "--weights", str(tiny_weights), "--group", "2",
                                              "--prompts", "2", "--steps", "1", "--repeats", "1", "--threads", "1",
                                              "--json"])
    torch.set_num_threads(threads)
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert {"group_seconds", "train_step_seconds", "achieved_gflops", "gemm_peak_gflops", "fraction_of_peak"} <= set(r)
    run = r["runs"][0]
    assert run["mode"] == "off" and run["compile_seconds"] == 0 and r["step_images"] == 4
    assert r["group_gflop"] > 0 and r["update_gflop"] > r["group_gflop"]  # backward and three passes per timestep
    assert run["train_step_seconds"] == pytest.approx(sum(run["step_parts_seconds"].values()))
    peak = r["gemm_peak_gflops"][f"{r['compute_dtype']}_model"]
    assert r["model_gemm_shapes"] > 0 and peak > 0 and r["gemm_peak_gflops"][f"{r['compute_dtype']}_large"] > 0
    assert r["achieved_gflops"]["group"] == pytest.approx(r["group_gflop"] / r["group_seconds"])
    assert r["fraction_of_peak"]["group"] == pytest.approx(r["achieved_gflops"]["group"] / peak)
    assert r["achieved_gflops"]["update"] == pytest.approx(r["update_gflop"] / run["step_parts_seconds"]["update"])
