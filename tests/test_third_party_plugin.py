"""The example third-party plugin: CONTRIBUTING shows it as it is, pip installs it, runs use it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dgpo-bench-sharpness"
BIN = Path(sys.executable).parent


def test_contributing_shows_the_example_files_verbatim():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    assert {path for path, _ in blocks} == {
        "examples/dgpo-bench-sharpness/pyproject.toml",
        "examples/dgpo-bench-sharpness/dgpo_bench_sharpness/__init__.py",
        "examples/dgpo-bench-sharpness/tests/test_sharpness.py",
    }
    for path, body in blocks:
        assert body == (ROOT / path).read_text(), f"CONTRIBUTING.md is out of date for {path}"


@pytest.fixture
def installed_example():
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(EXAMPLE)]
    subprocess.run(pip, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "dgpo-bench-sharpness"],
                       check=True, capture_output=True)


def _cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([str(BIN / "dgpo-bench"), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_pip_installed_plugin_is_listed_tested_and_trained_with(installed_example, tmp_path):
    listed = _cli("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["components"]
    row = next(r for r in rows if r["name"] == "sharpness")
    assert row == {"kind": "reward", "name": "sharpness", "plugin": "sharpness",
                   "version": "dgpo-bench-sharpness 0.1.0", "description": row["description"]}

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(EXAMPLE / "tests")], capture_output=True, text=True, cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout[-2000:]

    run = _cli("run", "--objective", "dgpo", "--reward", "ocr=1,sharpness=0.1", "--steps", "1",
               "--group-size", "4", "--prompts-per-step", "2", "--eval-prompts", "4", "-o", "sampler.steps=4",
               "-o", "eval-sampler.steps=4", "--out", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert set(result["tuned"]) == {"ocr", "sharpness"}
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["type"] == "train"]
    assert set(train[0]["rewards"]) == {"ocr", "sharpness"}
    assert 0.0 < train[0]["rewards"]["sharpness"] < 1.0


def test_a_reward_without_prompts_trains_alone_on_the_backbones_prompts(sharpness_plugin, tiny_weights, tmp_path,
                                                                         capsys):
    from dgpo_bench.cli import main
    from dgpo_bench_tasks import load_prompts

    run_dir = tmp_path / "run"
    code = main(["run", "--objective", "dgpo", "--reward", "sharpness", "--steps", "1", "--group-size", "2",
                 "--prompts-per-step", "2", "--eval-prompts", "3", "-o", f"nano.weights={tiny_weights}",
                 "-o", "sampler.steps=2", "-o", "eval-sampler.steps=2", "-o", "dgpo.num_timesteps=1",
                 "-o", "dgpo.trunc_steps=1", "--out", str(run_dir), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    note = "no reward here ships prompts: using the default train and eval prompts of backbone 'nano'"
    assert note in " ".join(captured.err.split())
    result = json.loads((run_dir / "result.json").read_text())
    assert note in result["notes"] and set(result["tuned"]) == {"sharpness"}
    # the tiny checkpoint is a 'text' world model: its held-out prompts are the text world's
    shown = json.loads((run_dir / "per_prompt.json").read_text())["prompts"]
    assert shown == [p["prompt"] for p in load_prompts("text", "eval")[:3]]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 < next(m for m in metrics if m["type"] == "train")["rewards"]["sharpness"] < 1.0
