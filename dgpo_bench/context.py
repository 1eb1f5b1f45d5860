"""The engine's side of an objective update: seeded RNG, collectives, and the update itself.

The backbone's trainable module and the optimizer are prepared by accelerate (DDP, FSDP2 or
DeepSpeed, as the user's accelerate config says); every backward, the gradient
synchronisation, clipping and the optimizer step go through them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
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
    of batches (an uneven split of the held-out prompts).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    try:
        acc = Accelerator(cpu=not torch.cuda.is_available(),
                          kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True,
                                                                          broadcast_buffers=False)])
    except ImportError as exc:  # the accelerate config names a package that is not installed
        raise SpecError(f"The accelerate configuration needs a package that is not installed ({exc}); install it "
                        "or launch with another configuration.") from None
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise SpecError("DeepSpeed runs are not supported yet (accelerate's DeepSpeed engine steps at every backward "
                        "pass of an update); launch with DDP (accelerate launch --multi_gpu) or FSDP2 (--use_fsdp "
                        "--fsdp_version 2) instead.")
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise SpecError("mixed_precision fp16 needs a GPU (its loss scaler runs on CUDA); on a CPU use bf16 or no "
                        "in the accelerate config or --mixed_precision.")
    return acc


class EngineContext(TrainContext):
    """Concrete ``TrainContext``: prepares the trainable module and AdamW through accelerate and runs
    each ``Objective.update`` on them, so N processes reproduce one."""

    def __init__(self, backbone: Backbone, sampler: Sampler, accelerator, options: OptimizerOptions,
                 seed: int, group_size: int, num_groups: int):
        self.backbone, self.sampler, self.accelerator = backbone, sampler, accelerator
        self.seed, self.group_size, self.num_groups = seed, group_size, num_groups
        self.step = 0
        optimizer = torch.optim.AdamW(backbone.trainable_parameters(), lr=options.lr, betas=tuple(options.betas),
                                      weight_decay=options.weight_decay)
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
        """The optimizer's state with whole tensors (gathered under FSDP2, where every process calls it
        and the main one receives it)."""
        if not self.accelerator.is_fsdp2:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, state: dict) -> None:
        """Load what ``optimizer_state`` returned (sharded again under FSDP2)."""
        if not self.accelerator.is_fsdp2:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

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
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.module):
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
        """Clip (after unscaling fp16 gradients), step the prepared optimizer and zero; the grad norm."""
        norm = self.accelerator.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else math.inf)
        norm = float(norm) if norm is not None else float("nan")
        if not math.isfinite(norm) and self.accelerator.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(f"The gradient norm became {norm} at step {self.step}; lower the learning rate.")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backbone.meter.optimizer_steps += 1
        return norm


def sample_seeds(seed: int, step: int, indices: Sequence[int], purpose: str = "rollout") -> list[int]:
    """Per-sample noise seeds for global sample ``indices`` of rollout ``step``."""
    return [derive_seed(seed, purpose, step, int(i)) for i in indices]
