"""benchmarks/paired_gain.py reads a real run's per-prompt scores and pairs them by prompt."""

import json
import shutil

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def paired():
    return load_benchmark("paired_gain")


def rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| run") and not line.startswith("| quoted")]


def test_reads_a_real_run_and_pairs_the_gain_by_prompt(paired, tiny_weights, tmp_path, capsys):
    from dgpo_bench.cli import main

    run = tmp_path / "run"
    code = main(["run", "--objective", "dgpo", "--reward", "ocr", "--steps", "1", "--group-size", "2",
                 "--prompts-per-step", "2", "--eval-prompts", "4", "-o", f"nano.weights={tiny_weights}",
                 "-o", "sampler.steps=2", "-o", "eval-sampler.steps=2", "-o", "dgpo.num_timesteps=1",
                 "-o", "dgpo.trunc_steps=1", "--eval-every", "1", "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    result = json.loads((run / "result.json").read_text())
    assert paired.main([str(run)]) == 0
    (row,) = rows(capsys.readouterr().out)
    assert row[1] == "4" and float(row[2]) == pytest.approx(result["base"]["ocr"], abs=5e-4)
    assert float(row[3]) == pytest.approx(result["tuned"]["ocr"], abs=5e-4)

    # the evaluation at step 1 (from metrics.jsonl) is the final one here; there is none at step 2
    assert paired.main([str(run), "--step", "1"]) == 0
    assert rows(capsys.readouterr().out) == [row]
    assert paired.main([str(run), "--step", "2"]) == 2
    assert "no per-prompt evaluation at step 2; it has steps 1." in capsys.readouterr().err

    # a second "seed" on the same prompts, with known scores: gains +0.5, 0, -0.25, +0.25 per prompt
    other = tmp_path / "other"
    shutil.copytree(run, other)
    data = json.loads((run / "per_prompt.json").read_text())
    data["base"]["ocr"], data["final"]["ocr"] = [0.0, 0.5, 0.5, 0.25], [0.5, 0.5, 0.25, 0.5]
    (other / "per_prompt.json").write_text(json.dumps(data))
    assert paired.main([str(other), "--by", "quote-length"]) == 0
    out = capsys.readouterr().out
    row = rows(out)[0]
    assert row[2:5] + row[6:] == ["0.312", "0.438", "+0.125", "2 / 1"]
    lo, hi = (float(x) for x in row[5].strip("[]").split(","))
    assert -0.25 <= lo < 0.125 < hi <= 0.5
    lengths = [paired.quote_length(p) for p in data["prompts"]]
    assert all(n and n > 0 for n in lengths)
    assert sum(int(r[1]) for r in rows(out)[1:]) == 4  # every prompt in one length row

    assert paired.main([str(run), str(other)]) == 0
    real = [f - b for b, f in zip(*(json.loads((run / "per_prompt.json").read_text())[k]["ocr"]
                                   for k in ("base", "final")))]
    pooled = sum((r + s) / 2 for r, s in zip(real, [0.5, 0.0, -0.25, 0.25])) / 4
    assert f"pooled over 2 run(s): gain {pooled:+.3f}" in capsys.readouterr().out


def test_bootstrap_interval_is_the_percentiles_of_resampled_means(paired):
    assert paired.bootstrap_ci(np.full(7, 0.3), 100, 0) == pytest.approx((0.3, 0.3))
    # two values: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    assert paired.bootstrap_ci(np.array([0.0, 1.0]), 20000, 0) == (0.0, 1.0)
    assert paired.bootstrap_ci(np.array([0.0, 1.0]), 20000, 1) == paired.bootstrap_ci(np.array([0.0, 1.0]), 20000, 1)


def test_a_run_without_base_scores_is_refused_in_one_line(paired, tmp_path, capsys):
    (tmp_path / "per_prompt.json").write_text(json.dumps({"prompts": ["a"], "final": {"ocr": [0.1]}}))
    assert paired.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no base scores" in err
    assert paired.main([str(tmp_path / "missing")]) == 2
    assert "no per_prompt.json" in capsys.readouterr().err


def test_an_unfinished_run_is_read_with_step(paired, tmp_path, capsys):
    (tmp_path / "per_prompt.json").write_text(json.dumps({"prompts": ["a", "b"], "base": {"ocr": [0.1, 0.3]}}))
    evals = [{"type": "eval", "step": 0, "label": "base", "per_prompt": {"ocr": [0.1, 0.3]}},
             {"type": "train", "step": 1},
             {"type": "eval", "step": 1, "label": "step00001", "per_prompt": {"ocr": [0.5, 0.4]}}]
    assert paired.main([str(tmp_path), "--step", "1"]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    # the last line is cut short, as while the run is writing it
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals) + '{"type": "ev')
    assert paired.main([str(tmp_path)]) == 2
    assert "has not finished; pass --step" in capsys.readouterr().err
    assert paired.main([str(tmp_path), "--step", "1", "--reward", "ocr"]) == 0
    (row,) = rows(capsys.readouterr().out)
    assert row[1:5] + row[6:] == ["2", "0.200", "0.450", "+0.250", "2 / 0"]
