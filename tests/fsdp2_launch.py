"""Test harness, run by ``accelerate launch --config_file``: dgpo-bench's CLI on accelerate's own FSDP2
path on a CPU (``dgpo_bench.testing.force_fsdp2_on_cpu``). ``STOP_AFTER_CHECKPOINT=N`` ends every
process right after the checkpoint of step N is written (an interruption, for the resume test).
"""

import os
import sys

from dgpo_bench.testing import force_fsdp2_on_cpu

force_fsdp2_on_cpu()

if os.environ.get("STOP_AFTER_CHECKPOINT"):
    from dgpo_bench.engine import Engine

    stop, save = int(os.environ["STOP_AFTER_CHECKPOINT"]), Engine._save_checkpoint

    def save_then_stop(self, step, base):
        save(self, step, base)
        if step == stop:
            self.acc.wait_for_everyone()
            os._exit(3)

    Engine._save_checkpoint = save_then_stop

from dgpo_bench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
