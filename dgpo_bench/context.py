"""The engine's side of an objective update: seeded RNG, collectives, and the update itself.

The backbone's trainable module and the optimizer are prepared by accelerate (DDP, FSDP2 or
DeepSpeed, as the user's accelerate config says); every backward, the gradient
synchronisation, clipping and the optimizer step go through them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from typing import Sequence

import torch

from .contracts import (Backbone, Objective, OptimizerOptions, RolloutBatch, Sampler, StepOutput, TrainContext,
                        Update)
from .errors import ObjectiveContractError, SpecError, TrainingDivergedError


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on ``keys`` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_accelerator():
    """The run's Accelerator, configured by ``accelerate launch`` / the user's accelerate config.

    DDP is told to expect parameters that get no gradient (e.g. the context projections of
    an MM-DiT's last block, whose context output is discarded), and not to broadcast buffers
    at each forward: they are constants here (positional embeddings), and a broadcast would
    make every forward a collective, hanging wherever processes evaluate different numbers
    of batches (an uneven split of the held-out prompts). DeepSpeed on a CPU runs under gloo
    (accelerate names no backend for it there, and would count one process per rank).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    if cpu:  # DeepSpeed, imported by accelerate and transformers where installed, would log its guess on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)]
    if cpu and deepspeed:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    try:
        acc = Accelerator(cpu=cpu and not deepspeed, kwargs_handlers=handlers)
    except ImportError as exc:  # the accelerate config names a package that is not installed
        raise SpecError(f"The accelerate configuration needs a package that is not installed ({exc}); install it "
                        "or launch with another configuration.") from None
    if acc.distributed_type == DistributedType.DEEPSPEED:
        _check_deepspeed(acc.state.deepspeed_plugin.deepspeed_config)
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise SpecError("mixed_precision fp16 needs a GPU (its loss scaler runs on CUDA); on a CPU use bf16 or no "
                        "in the accelerate config or --mixed_precision.")
    return acc


def _check_deepspeed(config: dict) -> None:
    """Refuse DeepSpeed settings the engine cannot honour; fill the batch size it never uses."""
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise SpecError(f"DeepSpeed ZeRO stage {stage} shards the parameters, which the reference, EMA and "
                        "export paths do not gather; use ZeRO stage 2 (configs/accelerate/zero2_8gpu.yaml) or FSDP2.")
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise SpecError(f"DeepSpeed's gradient_accumulation_steps is {config['gradient_accumulation_steps']}, but "
                        "the objective sets the passes of each update; set it to 1 in the DeepSpeed config.")
    config["gradient_accumulation_steps"] = 1
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # needed without a dataloader; unused
        config["train_micro_batch_size_per_gpu"] = 1


class EngineContext(TrainContext):
    """Concrete ``TrainContext``: prepares the trainable module and AdamW through accelerate and runs
    each ``Objective.update`` on them, so N processes reproduce one."""

    def __init__(self, backbone: Backbone, sampler: Sampler, accelerator, options: OptimizerOptions,
                 seed: int, group_size: int, num_groups: int):
        from accelerate.utils import DistributedType

        self.backbone, self.sampler, self.accelerator = backbone, sampler, accelerator
        self.seed, self.group_size, self.num_groups = seed, group_size, num_groups
        self.step = 0
        optimizer = torch.optim.AdamW(backbone.trainable_parameters(), lr=options.lr, betas=tuple(options.betas),
                                      weight_decay=options.weight_decay)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:  # DeepSpeed clips inside its own step
            _set_deepspeed_clipping(accelerator.state.deepspeed_plugin.deepspeed_config, options.grad_clip)
        self.module, self.optimizer = accelerator.prepare(backbone.trainable_module(), optimizer)
        backbone.use_prepared(self.module)
        reference = backbone.reference_module()
        if reference is not None and accelerator.is_fsdp2:  # sharded like the policy, as TRL does it
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            fsdp2_prepare_model(accelerator, reference)  # in place
        self.grad_clip = options.grad_clip

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.backbone.trainable_parameters()

    def optimizer_state(self) -> dict:
        """The optimizer's state, which every process calls and the main one receives: whole tensors
        (gathered under FSDP2), or under DeepSpeed each process's ZeRO partition, in rank order."""
        if self.deepspeed:
            import torch.distributed as dist

            parts = [None] * self.num_processes if self.accelerator.is_main_process else None
            dist.gather_object(self.optimizer.optimizer.state_dict(), parts, dst=0)
            return {"deepspeed_partitions": parts}
        if not self.accelerator.is_fsdp2:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, state: dict) -> None:
        """Load what ``optimizer_state`` returned (sharded again under FSDP2; under DeepSpeed each process
        takes its partition, with its fp32 master weights, so the world size must be the same)."""
        if self.deepspeed:
            parts = state.get("deepspeed_partitions") if isinstance(state, dict) else None
            if not parts or len(parts) != self.num_processes:
                raise SpecError(f"This checkpoint's optimizer state was not written by DeepSpeed on "
                                f"{self.num_processes} processes; resume it with the launch configuration that "
                                "wrote it.")
            self.optimizer.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
            return
        if "deepspeed_partitions" in state:
            raise SpecError("This checkpoint's optimizer state is DeepSpeed's ZeRO partitions; resume it under the "
                            "DeepSpeed launch configuration that wrote it.")
        if not self.accelerator.is_fsdp2:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    def checkpoint_globals(self) -> list[type]:
        """The classes a checkpoint's optimizer state may hold besides tensors and containers (DeepSpeed's
        ZeRO state pickles its loss scaler, stage and fragment addresses), allowed when it is read."""
        if not self.deepspeed:
            return []
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        return [LossScaler, ZeroStageEnum, fragment_address]

    def rng(self, *keys: int | str) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(derive_seed(self.seed, "objective", self.step, *keys))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return self.accelerator.gather(tensor.contiguous())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    def group_sum(self, values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-group sums of a per-sample tensor over all processes -> (num_groups,)."""
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        out.index_add_(0, group_ids.to(values.device), values)
        return self.all_reduce_sum(out)

    # ------------------------------------------------------------------ the update
    def update(self, objective: Objective, batch: RolloutBatch) -> StepOutput:
        """One optimizer update of ``objective`` on ``batch``, then its ``after_update``."""
        out = self.run(objective.update(batch, self), objective.name)
        objective.after_update(self)
        return out

    def run(self, plan: Update, name: str) -> StepOutput:
        """Backpropagate every pass of ``plan`` (without gradient synchronisation until the last),
        clip, step the optimizer and zero the gradients; ``name`` is the objective's, for messages."""
        self._check_passes(name, plan.passes)
        losses = iter(plan.losses)
        for i in range(plan.passes):
            last = i == plan.passes - 1
            with contextlib.nullcontext() if last else self._accumulating():
                loss = next(losses, None)
                if loss is None:
                    raise ObjectiveContractError(f"Objective '{name}' planned {plan.passes} passes but yielded {i}; "
                                                 "make Update.passes count its losses.")
                self._backward(loss)
        try:
            next(losses)
        except StopIteration as stop:
            out = stop.value
        else:
            raise ObjectiveContractError(f"Objective '{name}' yielded more losses than the {plan.passes} passes it "
                                         "planned; make Update.passes count its losses.")
        if not isinstance(out, StepOutput):
            raise ObjectiveContractError(f"Objective '{name}''s loss generator must return a StepOutput with its "
                                         f"diagnostics, not {type(out).__name__}.")
        out.metrics["grad_norm"] = self._apply_gradients()
        return out

    @contextlib.contextmanager
    def _accumulating(self):
        """Backward passes here keep their gradients local; under DeepSpeed (whose ``no_sync`` does nothing
        at ZeRO stage 2) they are marked as not ending the update, so its engine neither reduces nor steps."""
        if not self.deepspeed:
            with self.accelerator.no_sync(self.module):
                yield
            return
        state = self.accelerator.gradient_state
        state._set_sync_gradients(False)
        try:
            yield
        finally:
            state._set_sync_gradients(True)

    def _check_passes(self, name: str, passes: int) -> None:
        counts = self.gather(torch.tensor([int(passes)], device=self.accelerator.device)).tolist()
        if min(counts) < 1 or min(counts) != max(counts):
            raise ObjectiveContractError(
                f"Objective '{name}' planned {counts if len(counts) > 1 else passes} passes "
                f"{'on its processes ' if len(counts) > 1 else ''}for step {self.step}; every process must run "
                "the same number, at least one (pad with zero-weight passes where a process has less data)."
            )

    def _backward(self, loss: torch.Tensor) -> None:
        if loss.ndim != 0 or not loss.requires_grad:
            raise ObjectiveContractError("An objective's loss must be a scalar with a gradient, from one policy "
                                         "forward of this pass.")
        if not torch.isfinite(loss.detach()):
            raise TrainingDivergedError(
                f"The loss became {loss.detach().float().item()} at step {self.step}; lower the learning "
                "rate or the objective's beta, or check the reward for NaN scores."
            )
        # the update's loss is the sum over processes; DDP, FSDP and DeepSpeed average gradients
        self.accelerator.backward(loss * self.num_processes)

    def _apply_gradients(self) -> float:
        """Clip (after unscaling fp16 gradients), step the prepared optimizer and zero; the grad norm (before
        clipping). DeepSpeed has already clipped and stepped in the last backward; this reads its norm."""
        norm = self.accelerator.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else math.inf)
        norm = float(norm) if norm is not None else float("nan")
        if not math.isfinite(norm) and self.accelerator.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(f"The gradient norm became {norm} at step {self.step}; lower the learning rate.")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backbone.meter.optimizer_steps += 1
        return norm


def _set_deepspeed_clipping(config: dict, grad_clip: float) -> None:
    """Give DeepSpeed the objective's clip norm, or refuse a config that sets another."""
    value = config.get("gradient_clipping", "auto")
    if value == "auto":
        config["gradient_clipping"] = grad_clip
    elif float(value) != grad_clip:
        raise SpecError(f"The DeepSpeed config clips gradients at {value} but the objective's grad_clip is "
                        f"{grad_clip}; remove gradient_clipping from the DeepSpeed config (the engine sets it) or "
                        f"set the objective's grad_clip to {value} (-o OBJECTIVE.grad_clip={value}).")


def sample_seeds(seed: int, step: int, indices: Sequence[int], purpose: str = "rollout") -> list[int]:
    """Per-sample noise seeds for global sample ``indices`` of rollout ``step``."""
    return [derive_seed(seed, purpose, step, int(i)) for i in indices]
