"""GPU cost of DGPO vs Flow-GRPO steps on an SD3.5-Medium-sized MM-DiT (not a test).

An ``SD3Transformer2DModel`` with SD3.5-Medium's shape (24 MM-DiT blocks, 24 heads of 64,
patch 2, 16 latent channels, dual attention in blocks 0-12, qk RMS norm) and random
weights, bf16, LoRA r 64 / alpha 128 on the attention projections through the project's
own backbone base class (reference = adapters disabled), at 512 px (64x64 latents,
1024 image + 205 text tokens). Prompt embeddings are random tensors of SD3's shapes
(77 CLIP + 128 T5 tokens of width 4096, pooled 2048); text encoders and VAE are not run.

Measures: rollout images/s (10-step Euler ODE, CFG 4.5, shift 3); one DGPO-shaped
optimizer step (8 prompts x G, G in {16, 24}; 4 timesteps; reference, fast-EMA and a
no-grad policy pass for the group weights, then policy forward + backward per
micro-batch); one Flow-GRPO-shaped step (9 SDE transitions re-scored with CFG, reference
with CFG for the KL, backward through both CFG branches) on the same batch. For each:
seconds, peak GPU memory, FLOPs (counted with torch.utils.flop_counter on one sample)
and model FLOP utilisation (on CPU the counter misses attention). Values of the batch
are synthetic; timings do not depend on them.

    python benchmarks/gpu_sd35m.py                  # one CUDA GPU, < 10 minutes on an H100
    python benchmarks/gpu_sd35m.py --compile --attention flash --micro-batch 16
    python benchmarks/gpu_sd35m.py --tiny           # reduced config on CPU: exercises every code path

``--compile`` compiles the denoiser (the backbone's ``compile=on``; the warm-up compiles every
batch shape the workloads use and is reported apart, as ``compile_seconds``); ``--attention``
pins scaled-dot-product attention to one kernel (flash, memory-efficient, cuDNN or math).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch

from dgpo_bench.context import EngineContext
from dgpo_bench.contracts import Conditioning, LoadContext, OptimizerOptions, StepOutput, Update
from dgpo_bench.meters import compile_seconds
from dgpo_bench_backbones.transformer import TransformerBackbone

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))
"""Dense bf16 tensor-core peaks by device name (first match wins)."""
VAE_FACTOR, SHIFT, GUIDANCE, ROLLOUT_STEPS = 8, 3.0, 4.5, 10
DGPO = dict(beta_dpo=100.0, beta_kl=0.02, clip=1e-2, timesteps=4, trunc_steps=6)
GRPO = dict(beta_kl=0.04, clip=1e-4, noise_level=0.7, trained_steps=9)
ATTENTION = {"default": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


class RandomMMDiT(TransformerBackbone):
    """An SD3-architecture transformer with random weights and random prompt embeddings of SD3's shapes."""

    name = "random-mmdit"

    def __init__(self, config: dict, text_tokens: int, resolution: int, options: dict):
        super().__init__(options)
        self.config, self.text_tokens, self.resolution = config, text_tokens, resolution

    def load(self, ctx: LoadContext) -> None:
        from diffusers import SD3Transformer2DModel

        from dgpo_bench_backbones.transformer import DTYPES

        self.device, self.dtype = ctx.device, DTYPES[self.options.dtype]
        torch.manual_seed(ctx.seed)
        with torch.device(ctx.device):
            transformer = SD3Transformer2DModel(**self.config).to(self.dtype)
        side = self.resolution // VAE_FACTOR
        self.latent_shape = (self.config["in_channels"], side, side)
        self.default_guidance_scale, self.default_shift = GUIDANCE, SHIFT
        self._attach_transformer(transformer, ctx.seed)

    def _encode_uncached(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [torch.Generator().manual_seed(zlib.crc32(t.encode())) for t in texts]
        ehs = torch.stack([torch.randn(self.text_tokens, self.config["joint_attention_dim"], generator=g)
                           for g in rows])
        pooled = torch.stack([torch.randn(self.config["pooled_projection_dim"], generator=g) for g in rows])
        return {"encoder_hidden_states": ehs.to(self.device, self.dtype),
                "pooled_projections": pooled.to(self.device, self.dtype)}

    def decode(self, latents):
        raise NotImplementedError("the benchmark does not decode")


# ----------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, fn):
    """(result, seconds, peak GiB or None) of ``fn()``."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, seconds, peak


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def mse(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (v.float() - target).square().flatten(1).mean(1)


def sigma_grid(steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    sched.set_timesteps(steps)
    return sched.sigmas.float()


def flops_per_sample(bb: RandomMMDiT, cond: Conditioning) -> tuple[int, int]:
    """FLOPs of one conditional forward, and of a forward + backward to the LoRA weights, for one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *bb.latent_shape, device=bb.device)
    s = torch.tensor([0.5], device=bb.device)
    c = cond.select(slice(0, 1))
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        bb.velocity(x, s, c)
    with FlopCounterMode(display=False) as both:
        bb.velocity(x, s, c).square().mean().backward()
    for p in bb.trainable_parameters():
        p.grad = None
    return fwd.get_total_flops(), both.get_total_flops()


# ----------------------------------------------------------------------------- the three workloads


@torch.no_grad()
def rollout(bb: RandomMMDiT, cond: Conditioning, noise: torch.Tensor, batch: int) -> torch.Tensor:
    """10-step Euler on the shifted flow grid with CFG, ``batch`` images at a time."""
    sig = sigma_grid(ROLLOUT_STEPS).to(bb.device)
    out = []
    for c in chunks(len(noise), batch):
        x = noise[c]
        for k in range(ROLLOUT_STEPS):
            x = x + (sig[k + 1] - sig[k]) * bb.velocity(x, sig[k], cond.select(c), guidance_scale=GUIDANCE)
        out.append(x)
    return torch.cat(out)


def dgpo_step(bb: RandomMMDiT, ctx: EngineContext, cond: Conditioning, x0: torch.Tensor, gids: torch.Tensor,
              adv: torch.Tensor, ema: list[torch.Tensor], micro: int) -> float:
    """One DGPO step as released (the dgpo objective's loss, written out); returns the grad norm."""
    n, G, dev = len(x0), ctx.group_size, bb.device
    parts = chunks(n, micro)
    gen = torch.Generator().manual_seed(ctx.step)
    pool = sigma_grid(ROLLOUT_STEPS)[: DGPO["trunc_steps"] + 1]
    train_sigmas = pool[torch.randperm(len(pool), generator=gen)[: DGPO["timesteps"]]].to(dev)

    def velocities(x, s):
        return torch.cat([bb.velocity(x[c], s, cond.select(c)) for c in parts])

    def losses():
        for s in train_sigmas:
            eps = torch.randn(ctx.num_groups, *x0.shape[1:], generator=gen)[gids.cpu()].to(dev)
            x_t, target = (1 - s) * x0 + s * eps, eps - x0
            with torch.no_grad():
                with bb.reference():
                    v_ref = velocities(x_t, s)
                with bb.swapped_weights(ema, role="ema"):
                    L_old = mse(velocities(x_t, s), target)
                gap = adv * (mse(velocities(x_t, s), target) - mse(v_ref, target))
                s_g = DGPO["beta_dpo"] / G * torch.zeros(ctx.num_groups, device=dev).index_add(0, gids, gap)
                w = torch.sigmoid(s_g)[gids]
            for c in parts:
                v = bb.velocity(x_t[c], s, cond.select(c))
                L = mse(v, target[c])
                rho = torch.exp(L_old[c] - L.detach())
                clipped = torch.where(adv[c] > 0, rho > 1 + DGPO["clip"], rho < 1 - DGPO["clip"])
                L = torch.where(clipped, L.detach(), L)
                kl = (v.float() - v_ref[c]).square().flatten(1).mean(1)
                yield ((w[c] * adv[c] * L).sum() + DGPO["beta_kl"] * kl.sum()) / (N * len(train_sigmas))
        return StepOutput({})

    N = n * ctx.num_processes
    return ctx.run(Update(len(train_sigmas) * len(parts), losses()), "dgpo").metrics["grad_norm"]


def sde_step(bb: RandomMMDiT, cond: Conditioning, x: torch.Tensor, x_next: torch.Tensor, s: torch.Tensor,
             s_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob, mean, std_dev_t) of Flow-GRPO's SDE transition x -> x_next under CFG (fp32)."""
    v = bb.velocity(x, s, cond, guidance_scale=GUIDANCE)
    dt = s_next - s
    std = GRPO["noise_level"] * torch.sqrt(s / (1 - torch.where(s >= 1, s_next, s)))
    mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * torch.sqrt(-dt)
    logp = -((x_next - mean) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1), mean, std


def grpo_step(bb: RandomMMDiT, ctx: EngineContext, cond: Conditioning, x0: torch.Tensor, adv: torch.Tensor,
              micro: int) -> float:
    """One Flow-GRPO step as released on the first 9 transitions of a 10-step trajectory."""
    n, dev = len(x0), bb.device
    sig = sigma_grid(ROLLOUT_STEPS).to(dev)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(ctx.step)).to(dev)
    K = GRPO["trained_steps"]
    parts = chunks(n, micro)

    def losses():
        for k in range(K):
            x, x_next = (1 - sig[k]) * x0 + sig[k] * eps, (1 - sig[k + 1]) * x0 + sig[k + 1] * eps
            for c in parts:
                logp, mean, std = sde_step(bb, cond.select(c), x[c], x_next[c], sig[k], sig[k + 1])
                ratio = torch.exp(logp - logp.detach())  # on-policy: the rollout's own log-probs
                a = adv[c]
                pl = torch.maximum(-a * ratio, -a * ratio.clamp(1 - GRPO["clip"], 1 + GRPO["clip"]))
                with torch.no_grad(), bb.reference():
                    _, mean_ref, _ = sde_step(bb, cond.select(c), x[c], x_next[c], sig[k], sig[k + 1])
                kl = (mean - mean_ref).square().flatten(1).mean(1) / (2 * std**2)
                yield (pl.sum() + GRPO["beta_kl"] * kl.sum()) / (n * ctx.num_processes * K)
        return StepOutput({})

    return ctx.run(Update(K * len(parts), losses()), "flow-grpo").metrics["grad_norm"]


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="reduced model and batch on CPU (proves the code paths)")
    p.add_argument("--groups", type=int, nargs="+", help="group sizes G (default 16 24; tiny 2 3)")
    p.add_argument("--prompts", type=int, help="prompts per step (default 8; tiny 2)")
    p.add_argument("--rollout-images", type=int, help="images in the rollout timing (default 64; tiny 4)")
    p.add_argument("--rollout-batch", type=int, help="images per rollout forward (default 16; tiny 2)")
    p.add_argument("--micro-batch", type=int, help="samples per training forward/backward (default 8; tiny 2)")
    p.add_argument("--lora-rank", type=int, help="default 64; tiny 4")
    p.add_argument("--resolution", type=int, help="pixels (default 512; tiny 64)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (inductor)")
    p.add_argument("--attention", choices=sorted(ATTENTION), default="default",
                   help="the scaled-dot-product attention kernel (default: torch's choice)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (else by name)")
    p.add_argument("--max-seconds", type=float, default=540.0, help="skip workloads predicted to end later")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    defaults = (dict(groups=[2, 3], prompts=2, rollout_images=4, rollout_batch=2, micro_batch=2, lora_rank=4,
                     resolution=64) if args.tiny else
                dict(groups=[16, 24], prompts=8, rollout_images=64, rollout_batch=16, micro_batch=8, lora_rank=64,
                     resolution=512))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_sd35m.py needs a CUDA GPU; run it on one, or pass --tiny for a reduced CPU run of the same "
              "code paths.", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = ATTENTION[args.attention]
    with sdpa_kernel(getattr(SDPBackend, kernel)) if kernel else contextlib.nullcontext():
        return run(args)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)  # the tiny model is all overhead; more threads only contend
    bb = RandomMMDiT(TINY if args.tiny else SD35_MEDIUM, 16 if args.tiny else 77 + 128, args.resolution,
                     {"dtype": "fp32" if args.tiny else "bf16", "lora_rank": args.lora_rank,
                      "lora_alpha": 2 * args.lora_rank, "gradient_checkpointing": args.gradient_checkpointing,
                      "compile": "on" if args.compile else "off"})
    bb.load(LoadContext(device=device))
    bb.train()
    peak = peak_tflops(device, args.peak_tflops)
    n_params = sum(p.numel() for p in bb.transformer.parameters())
    n_lora = sum(p.numel() for p in bb.trainable_parameters())
    C, H, W = bb.latent_shape
    tokens = (H // bb.config["patch_size"]) * (W // bb.config["patch_size"])
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": bb.options.dtype, "config": "tiny" if args.tiny else "sd3.5-medium",
        "params": n_params - n_lora, "lora_params": n_lora, "lora_rank": args.lora_rank,
        "resolution": args.resolution, "image_tokens": tokens, "text_tokens": bb.text_tokens,
        "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile, "attention": args.attention,
        "peak_tflops": peak, "workloads": {},
    }
    print(f"{report['device']} | torch {torch.__version__} | {bb.options.dtype} | {report['config']} MM-DiT "
          f"{(n_params - n_lora) / 1e9:.4g}B params (random) + LoRA r{args.lora_rank} {n_lora / 1e6:.4g}M | "
          f"{args.resolution} px = {tokens} image + {bb.text_tokens} text tokens")

    cond_all = bb.encode_prompts([f"prompt {i}" for i in range(max(args.prompts, args.rollout_images))])
    with torch.compiler.set_stance("force_eager"):  # counted eagerly; a compiled denoiser compiles below
        fwd, fwd_bwd = flops_per_sample(bb, cond_all)
    report.update(fwd_flops_per_sample=fwd, fwd_bwd_flops_per_sample=fwd_bwd)
    print(f"FLOPs per sample: forward {fwd / 1e12:.4g} TFLOP, forward+backward (LoRA) {fwd_bwd / 1e12:.4g} TFLOP")

    gen = torch.Generator().manual_seed(0)
    warm = torch.randn(max(args.rollout_batch, args.micro_batch), C, H, W, generator=gen).to(device)
    compiled_before = compile_seconds()
    mb = slice(0, args.micro_batch)
    with torch.no_grad():  # warm-up: kernels, allocator, and every shape a compiled denoiser meets below
        bb.velocity(warm[: args.rollout_batch], 0.5, cond_all.select(slice(0, args.rollout_batch)),
                    guidance_scale=GUIDANCE)
        if args.compile:
            bb.velocity(warm[mb], 0.5, cond_all.select(mb))
            bb.velocity(warm[mb], 0.5, cond_all.select(mb), guidance_scale=GUIDANCE)
            with bb.reference():
                bb.velocity(warm[mb], 0.5, cond_all.select(mb))
                bb.velocity(warm[mb], 0.5, cond_all.select(mb), guidance_scale=GUIDANCE)
    for g in (1.0, GUIDANCE) if args.compile else (1.0,):
        bb.velocity(warm[mb], 0.5, cond_all.select(mb), guidance_scale=g).square().mean().backward()
    for p in bb.trainable_parameters():
        p.grad = None
    report["compile_seconds"] = round(compile_seconds() - compiled_before, 1)
    if args.compile:
        print(f"compiled in {report['compile_seconds']} s (warm-up, not in the figures below)")
    rate = None  # achieved FLOP/s of the rollout, to predict the other workloads

    def record(name: str, flops: float, seconds: float, mem: float | None, **extra) -> None:
        nonlocal rate
        achieved = flops / seconds
        rate = rate or achieved
        row = dict(seconds=round(seconds, 3), peak_gib=None if mem is None else round(mem, 2),
                   flops=int(flops), achieved_tflops_per_s=float(f"{achieved / 1e12:.4g}"),
                   mfu=None if peak is None else round(achieved / (peak * 1e12), 4), **extra)
        report["workloads"][name] = row
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        mem_s = "n/a" if mem is None else f"{mem:.1f} GiB"
        more = "".join(f", {k} {v}" for k, v in extra.items())
        print(f"{name:<18} {seconds:8.2f} s  peak {mem_s:>9}  {achieved / 1e12:8.4g} TFLOP/s  MFU {mfu}{more}")

    def affordable(name: str, flops: float) -> bool:
        predicted = flops / rate * 1.3 if rate else 0.0
        if time.perf_counter() - start + predicted > args.max_seconds:
            print(f"{name:<18} skipped: predicted {predicted:.0f} s would pass --max-seconds {args.max_seconds:.0f}")
            report["workloads"][name] = {"skipped": True, "predicted_seconds": round(predicted, 1)}
            return False
        return True

    noise = torch.randn(args.rollout_images, C, H, W, generator=gen).to(device)
    nfe0 = dict(bb.meter.nfe)
    _, sec, mem = measure(device, lambda: rollout(bb, cond_all.select(slice(0, args.rollout_images)), noise,
                                                  args.rollout_batch))
    record("rollout", args.rollout_images * ROLLOUT_STEPS * 2 * fwd, sec, mem,
           images_per_s=round(args.rollout_images / sec, 3),
           nfe=bb.meter.nfe["policy"] - nfe0.get("policy", 0))

    ema = [p.detach().clone() for p in bb.trainable_parameters()]
    accelerator = _accelerator(device)
    step_seconds = {}
    for G in args.groups:
        n = args.prompts * G
        gids = torch.arange(args.prompts, device=device).repeat_interleave(G)
        cond = cond_all.select(slice(0, args.prompts)).repeat_interleave(G)
        x0 = torch.randn(n, C, H, W, generator=gen).to(device)
        rewards = torch.rand(n, generator=gen).to(device)
        adv = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-4)).clamp(-5, 5)
        ctx = EngineContext(bb, None, accelerator, OptimizerOptions(lr=3e-4, weight_decay=1e-4),
                            seed=0, group_size=G, num_groups=args.prompts)
        dgpo_flops = n * DGPO["timesteps"] * (3 * fwd + fwd_bwd)
        if affordable(f"dgpo G={G}", dgpo_flops):
            nfe0 = dict(bb.meter.nfe)
            _, sec, mem = measure(device, lambda: dgpo_step(bb, ctx, cond, x0, gids, adv, ema, args.micro_batch))
            step_seconds[("dgpo", G)] = sec
            record(f"dgpo G={G}", dgpo_flops, sec, mem, samples=n,
                   nfe={k: v - nfe0.get(k, 0) for k, v in bb.meter.nfe.items()})
        grpo_flops = n * GRPO["trained_steps"] * (2 * fwd + 2 * fwd_bwd)
        if affordable(f"flow-grpo G={G}", grpo_flops):
            nfe0 = dict(bb.meter.nfe)
            _, sec, mem = measure(device, lambda: grpo_step(bb, ctx, cond, x0, adv, args.micro_batch))
            step_seconds[("grpo", G)] = sec
            record(f"flow-grpo G={G}", grpo_flops, sec, mem, samples=n,
                   nfe={k: v - nfe0.get(k, 0) for k, v in bb.meter.nfe.items()})
        if ("dgpo", G) in step_seconds and ("grpo", G) in step_seconds:
            ratio = step_seconds[("grpo", G)] / step_seconds[("dgpo", G)]
            report[f"grpo_over_dgpo_step_time_G{G}"] = round(ratio, 3)
            print(f"G={G}: a Flow-GRPO step takes {ratio:.2f}x the time of a DGPO step")
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    print(f"total {report['total_seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _accelerator(device: torch.device):
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu")


if __name__ == "__main__":
    sys.exit(main())
