"""Cost of the README's main command: wall-clock, CPU time and peak memory.

    python benchmarks/main_command.py [-- extra dgpo-bench run arguments]

Runs ``dgpo-bench run --objective dgpo --reward ocr --json`` (the quick start, default
budget) in a child process and prints its wall-clock seconds, CPU seconds (user + sys,
which stays meaningful on a loaded machine), peak resident memory, and the held-out
scores it reports. Goal on 2 CPU cores: at most 10 minutes (target 5), under 4 GB.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    extra = sys.argv[1:]
    if extra[:1] == ["--"]:
        extra = extra[1:]
    exe = Path(sys.executable).parent / "dgpo-bench"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(exe), "run", "--objective", "dgpo", "--reward", "ocr", "--json", "--out", f"{tmp}/run", *extra]
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            sys.exit(f"the command failed ({proc.returncode}): {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak_mb = after.ru_maxrss / 1024
    print("command:", " ".join(["dgpo-bench", *cmd[1:4], *cmd[4:6], *extra]))
    print(f"wall-clock      {wall:8.1f} s")
    print(f"CPU (user+sys)  {cpu:8.1f} s   ({cpu / max(wall, 1e-9):.2f} cores busy on average)")
    print(f"peak RSS        {peak_mb:8.0f} MiB")
    print(f"steps {result['steps']}, images {result['cost']['images']}, train {result['cost']['train_seconds']:.1f} s, "
          f"eval {result['cost']['seconds']['eval']:.1f} s, compile {result['cost']['seconds'].get('compile', 0):.1f} s")
    for name, base in result["base"].items():
        print(f"held-out {name}: base {base:.4f} -> tuned {result['tuned'][name]:.4f}")


if __name__ == "__main__":
    main()
