"""Tiny real backbones for numeric tests: every evaluation goes through ``Backbone.velocity``.

``MlpBackbone``: a small MLP velocity model with trainable weights and a frozen reference
copy. ``GaussianFlowBackbone``: the exact velocity of rectified flow from N(0, I) noise to
N(mu, s0^2 I) data, where mu = (prompt embedding + a trainable offset).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from dgpo_bench.context import EngineContext, make_accelerator
from dgpo_bench.contracts import (Backbone, Conditioning, LoadContext, Options, Prompt, RolloutBatch, Sampler,
                                  SampleNoise)


def prompt_embedding(text: str, dim: int) -> torch.Tensor:
    """A fixed pseudo-random embedding per text; the empty prompt maps to zeros."""
    if text == "":
        return torch.zeros(dim)
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**62)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class ToyOptions(Options):
    latent_shape: tuple[int, int, int] = (2, 4, 4)
    embed_dim: int = 8
    hidden: int = 32
    guidance_scale: float = 1.0
    shift: float = 1.0
    data_std: float = 0.5
    """GaussianFlowBackbone only: s0, the data standard deviation."""


class _ToyBase(Backbone):
    Options = ToyOptions

    def load(self, ctx: LoadContext) -> None:
        o = self.options
        self.latent_shape = tuple(o.latent_shape)
        self.default_guidance_scale, self.default_shift = o.guidance_scale, o.shift
        self.device = ctx.device
        self._in_reference = False
        self._build(torch.Generator().manual_seed(ctx.seed))

    def _build(self, gen: torch.Generator) -> None:
        raise NotImplementedError

    def encode_prompts(self, texts: Sequence[str]) -> Conditioning:
        emb = torch.stack([prompt_embedding(t, self.options.embed_dim) for t in texts])
        return Conditioning({"embedding": emb})

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = ((latents.detach().float().mean(1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.unsqueeze(-1).expand(*x.shape, 3).numpy()

    @contextlib.contextmanager
    def _reference_weights(self) -> Iterator[None]:
        outer, self._in_reference = self._in_reference, True
        try:
            yield
        finally:
            self._in_reference = outer

    def save_trainable(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        state = self.trainable_module().state_dict() if state is None else state
        torch.save([t.detach().clone() for t in state.values()], Path(directory) / "toy.pt")

    def load_trainable(self, directory: Path) -> None:
        with torch.no_grad():
            for p, t in zip(self.trainable_parameters(), torch.load(Path(directory) / "toy.pt")):
                p.copy_(t)


class MlpBackbone(_ToyBase):
    """v = MLP([x, sigma, prompt embedding]); the reference is a frozen copy made at load."""

    name = "toy-mlp"

    def _build(self, gen: torch.Generator) -> None:
        o = self.options
        d = int(np.prod(o.latent_shape))
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1 + o.embed_dim, o.hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(o.hidden, d))
        self.frozen = copy.deepcopy(self.net).requires_grad_(False)
        self.seen_sigmas: list[torch.Tensor] = []

    @torch.no_grad()
    def perturb(self, scale: float, seed: int = 1) -> None:
        """Move the trainable weights away from the reference (as after some training)."""
        gen = torch.Generator().manual_seed(seed)
        for p in self.net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))

    def _velocity(self, latents, sigmas, cond):
        self.seen_sigmas.append(sigmas.detach().clone())
        net = self.frozen if self._in_reference else self.policy_module
        inp = torch.cat([latents.flatten(1), sigmas[:, None], cond.tensors["embedding"]], dim=1)
        return net(inp).view_as(latents)

    def trainable_module(self) -> torch.nn.Module:
        return self.net

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.net.parameters())


class Offset(torch.nn.Module):
    """A scalar trainable offset, returned by ``forward`` (so it trains through the prepared module)."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self) -> torch.Tensor:
        return self.offset


class GaussianFlowBackbone(_ToyBase):
    """Exact velocity E[eps - x0 | x_t] for x0 ~ N(mu, s0^2 I), mu = embedding mean + offset."""

    name = "toy-gaussian"

    def _build(self, gen: torch.Generator) -> None:
        self.shift_module = Offset()

    @property
    def offset(self) -> torch.nn.Parameter:
        return self.shift_module.offset

    def mu(self, cond: Conditioning) -> torch.Tensor:
        offset = self.offset.detach() * 0 if self._in_reference else self.policy_module()
        return cond.tensors["embedding"].mean(1) + offset

    def _velocity(self, latents, sigmas, cond):
        s0 = self.options.data_std
        shape = (-1,) + (1,) * (latents.ndim - 1)
        t, mu = sigmas.view(shape), self.mu(cond).view(shape)
        var_t = (1 - t) ** 2 * s0**2 + t**2
        return -mu + (t - (1 - t) * s0**2) / var_t * (latents - (1 - t) * mu)

    def trainable_module(self) -> torch.nn.Module:
        return self.shift_module

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.offset]


def load_toy(cls: type[_ToyBase], seed: int = 0, **options) -> _ToyBase:
    bb = cls(options)
    bb.load(LoadContext(device=torch.device("cpu"), seed=seed))
    return bb


class RecordingContext(EngineContext):
    """The engine's context, keeping a copy of this process's (synchronised) gradients at each optimizer step."""

    def _apply_gradients(self) -> float:
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return super()._apply_gradients()


def make_context(bb: Backbone, sampler: Sampler, objective, group_size: int, num_groups: int, seed: int = 0,
                 step: int = 0) -> RecordingContext:
    ctx = RecordingContext(bb, sampler, make_accelerator(), objective.options, seed, group_size, num_groups)
    ctx.step = step
    objective.setup(ctx)
    return ctx


def rollout(bb: Backbone, sampler: Sampler, texts: Sequence[str], group_size: int, rewards: Sequence[float],
            seed: int = 0, trajectory: bool = False) -> RolloutBatch:
    """Groups of ``group_size`` samples per text, rolled out with ``sampler``, with the given rewards."""
    prompts = [Prompt(t) for t in texts for _ in range(group_size)]
    n = len(prompts)
    cond = bb.encode_prompts([p.text for p in prompts])
    noise = SampleNoise(range(seed * 10_000, seed * 10_000 + n)).randn(bb.latent_shape)
    out = sampler.sample(bb, cond, noise, step_noise=SampleNoise(range(seed * 10_000 + n, seed * 10_000 + 2 * n)),
                         trajectory=trajectory)
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    group_ids = torch.arange(n) // group_size
    return RolloutBatch(prompts=prompts, cond=cond, noise=noise, latents=out.latents, sigmas=out.sigmas,
                        group_ids=group_ids, rewards=rewards, guidance_scale=sampler.guidance(bb),
                        sample_ids=torch.arange(n), rollout_rewards=rewards, rollout_group_ids=group_ids,
                        trajectory=out.trajectory, log_probs=out.log_probs)


def batch_slice(batch: RolloutBatch, sl: slice) -> RolloutBatch:
    """The samples ``sl`` of a batch (what one process holds)."""
    def cut(t):
        return None if t is None else t[sl]
    return RolloutBatch(prompts=batch.prompts[sl], cond=batch.cond.select(sl), noise=batch.noise[sl],
                        latents=batch.latents[sl], sigmas=batch.sigmas, group_ids=batch.group_ids[sl],
                        rewards=batch.rewards[sl], guidance_scale=batch.guidance_scale,
                        sample_ids=batch.sample_ids[sl], rollout_rewards=batch.rollout_rewards,
                        rollout_group_ids=batch.rollout_group_ids, trajectory=cut(batch.trajectory),
                        log_probs=cut(batch.log_probs))


def plain_advantages(rewards: Sequence[float], group_size: int, global_std: bool, clip: float = 5.0) -> torch.Tensor:
    """(r - group mean) / (population std + 1e-4), clamped, written group by group."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(r)
    for start in range(0, len(r), group_size):
        g = r[start:start + group_size]
        std = r.std() if global_std else g.std()
        out[start:start + group_size] = (g - g.mean()) / (std + 1e-4)
    return torch.as_tensor(np.clip(out, -clip, clip), dtype=torch.float32)
