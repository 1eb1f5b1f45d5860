"""The README's main command at its default budget on the shipped nano model (slow: minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_main_command_finishes_on_the_default_budget_within_the_memory_limit(tmp_path):
    exe = Path(sys.executable).with_name("dgpo-bench")
    proc = subprocess.run([str(exe), "run", "--objective", "dgpo", "--reward", "ocr", "--out", str(tmp_path / "run"),
                           "--json"], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="0"))  # as it runs for a user
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert out["steps"] == 20 and result["spec"]["objective"]["name"] == "dgpo"
    assert result["spec"]["eval"]["prompts"] == 256 and 0.0 <= out["tuned"]["ocr"] <= 1.0
    assert out["cost"]["peak_rss_mb"] < 4096  # the memory limit for the quick start
    # nano compiles where bf16 is native (nano.compile=auto); the warm-up is charged apart
    assert (out["cost"]["seconds"]["compile"] > 0) == result["environment"]["cpu"]["native_bf16"]
    assert (tmp_path / "run" / "weights").is_dir() and (tmp_path / "run" / "samples" / "final.png").is_file()
