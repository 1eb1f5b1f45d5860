"""Test harness, run by ``accelerate launch --config_file``: dgpo-bench's CLI (``tests/cli_launch.py``,
with its ``STOP_AFTER_CHECKPOINT``) on accelerate's own FSDP2 path on a CPU
(``dgpo_bench.testing.force_fsdp2_on_cpu``).
"""

import runpy
from pathlib import Path

from dgpo_bench.testing import force_fsdp2_on_cpu

force_fsdp2_on_cpu()
runpy.run_path(str(Path(__file__).with_name("cli_launch.py")), run_name="__main__")
