"""Test harness, run by ``accelerate launch``: dgpo-bench's CLI, where ``STOP_AFTER_CHECKPOINT=N`` ends
every process right after the checkpoint of step N is written (an interruption, for the resume tests).
"""

import os
import sys

if os.environ.get("STOP_AFTER_CHECKPOINT"):
    from dgpo_bench.engine import Engine

    stop, save = int(os.environ["STOP_AFTER_CHECKPOINT"]), Engine._save_checkpoint

    def save_then_stop(self, step, base):
        save(self, step, base)
        if step == stop:
            self.acc.wait_for_everyone()
            os._exit(3)

    Engine._save_checkpoint = save_then_stop

if __name__ == "__main__":
    from dgpo_bench.cli import main

    sys.exit(main(sys.argv[1:]))
