"""Test harness, run by ``accelerate launch``: dgpo-bench's CLI on accelerate's own FSDP2 path, on a CPU.

accelerate 1.15 maps a multi-process CPU run to MULTI_CPU (DDP) even with an FSDP plugin, though
torch's ``fully_shard`` runs on CPU under gloo. This script builds the FSDP plugin from the
``FSDP_*`` variables that ``accelerate launch --config_file`` set (the shipped
configs/accelerate/fsdp2_8gpu.yaml in the test) and sets the distributed type to FSDP on both of
accelerate's shared states before the CLI runs; the engine's ``make_accelerator`` then gets that state, and ``accelerator.prepare`` shards
the model with ``fully_shard`` as it does on GPUs. ``STOP_AFTER_CHECKPOINT=N`` ends every process
right after the checkpoint of step N is written (an interruption, for the resume test).
"""

import os
import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets from the config file
Accelerator(cpu=True, fsdp_plugin=plugin)
PartialState().distributed_type = DistributedType.FSDP
AcceleratorState().distributed_type = DistributedType.FSDP
AcceleratorState().fsdp_plugin = plugin

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
