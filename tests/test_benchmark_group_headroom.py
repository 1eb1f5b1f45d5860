"""benchmarks/group_headroom.py summarises a model's own samples per held-out prompt."""

import json

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def headroom():
    return load_benchmark("group_headroom")


def test_summary_of_a_known_matrix(headroom):
    # 4 samples (rows) of 2 prompts (columns): the first prompt ties, the second spreads
    scores = np.array([[0.5, 0.0], [0.5, 1.0], [0.5, 0.0], [0.5, 1.0]])
    out = headroom.headroom(scores)
    assert out["mean"] == pytest.approx(0.5)
    assert out["best_of_n"] == pytest.approx(0.75)  # (0.5 + 1.0) / 2
    assert out["top_quarter_mean"] == pytest.approx(0.75)  # one sample per prompt: its best
    assert out["tied_prompt_share"] == pytest.approx(0.5)
    assert out["within_prompt_std"] == pytest.approx(0.25)  # (0 + 0.5) / 2
    # total variance 0.125 (values 0.5 x4, 0 x2, 1 x2 around 0.5); within-prompt: (0 + 0.25) / 2
    assert out["within_prompt_variance_share"] == pytest.approx(1.0)


def test_real_samples_of_the_shapes_model(headroom, capsys):
    import torch

    threads = torch.get_num_threads()
    code = headroom.main(["--reward", "compositional", "-o", "nano.world=shapes", "--prompts", "4",
                          "--samples", "2", "--threads", "1", "--json"])
    torch.set_num_threads(threads)
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = np.asarray(out["scores"])
    assert scores.shape == (2, 4) and out["prompts"] == 4 and out["reward"] == "compositional"
    assert out["best_of_n"] == pytest.approx(scores.max(axis=0).mean())
    assert out["mean"] <= out["top_quarter_mean"] <= out["best_of_n"] <= 1.0
    # seed 0 is the evaluation's own noise: its row is what `dgpo-bench eval` scores
    from dgpo_bench.cli import main

    assert main(["eval", "--reward", "compositional", "-o", "nano.world=shapes", "--prompts", "4", "--json"]) == 0
    torch.set_num_threads(threads)
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["compositional"] == pytest.approx(scores[0].mean())


def test_not_a_run_directory_is_one_line(headroom, tmp_path, capsys):
    assert headroom.main([str(tmp_path), "--samples", "2", "--prompts", "1"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
