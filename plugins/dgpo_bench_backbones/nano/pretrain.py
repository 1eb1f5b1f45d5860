"""Pretrain the nano backbone on a procedural world (text or shapes).

    python -m dgpo_bench_backbones.nano.pretrain --world text --seed 0 --out runs/pretrain/text --steps 5000
    # on a GPU, with batches rendered by three worker processes (the shipped text recipe):
    python -m dgpo_bench_backbones.nano.pretrain --world text --seed 0 --device cuda --workers 3 \
        --batch-size 128 --quote-max-len 16 --layout simple --out runs/gpu/s128 --steps 3500

Rectified flow (SD3), logit-normal sigma, AdamW, EMA, 10% condition dropout (prompt -> "")
so classifier-free guidance works.  Every ``eval_every`` steps the EMA model is sampled
on held-out prompts (FlowMatchEulerDiscreteScheduler, 10 steps, CFG) and scored with the
world's reward (OCR similarity / compositional checker); a checkpoint (EMA weights +
config, plus optimizer state of the latest one for ``--resume``) is written each time.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dgpo_bench.results import cpu_info

from .model import NanoConfig, NanoModel, generate, load_nano, save_nano, to_uint8


def log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- worlds
# NanoConfig fields that pretrain's flags override: field -> argparse destination
ARCH_FLAGS = {"patch_size": "patch_size", "num_layers": "layers", "num_attention_heads": "heads"}
# NanoConfig fields that are training or sampling settings, not part of the weights' shapes
SAMPLING_FIELDS = {"guidance_scale", "num_inference_steps", "shift", "cond_dropout"}


def shape_clash(got: NanoConfig, want: NanoConfig) -> list[str]:
    """Fields, other than training and sampling settings, in which two configs differ: where
    weights of one do not fit a model of the other."""
    return [f.name for f in dataclasses.fields(NanoConfig)
            if f.name not in SAMPLING_FIELDS and getattr(got, f.name) != getattr(want, f.name)]


def world_config(world: str, quote_max_len: int = 0) -> NanoConfig:
    if world == "text":
        return NanoConfig(world="text", height=32, width=128, quote_max_len=quote_max_len)
    if world == "shapes":
        return NanoConfig(world="shapes", height=64, width=64)
    raise ValueError(world)


def sample_batch(world: str, rng: np.random.Generator, n: int, layout: str = "varied"):
    """(prompts, uint8 images n x H x W x 3) from the world's training distribution."""
    if world == "text":
        from dgpo_bench_tasks import text as T

        prompts, imgs = [], []
        for _ in range(n):
            p, target = T.sample_example(rng, "train")
            prompts.append(p)
            imgs.append(T.render_text(target, rng, layout=layout))
        return prompts, np.stack(imgs)
    if world == "shapes":
        from dgpo_bench_tasks import shapes as S

        prompts, imgs = [], []
        for _ in range(n):
            scene = S.sample_scene(rng, "train")
            prompts.append(S.scene_prompt(scene))
            imgs.append(S.render_scene(scene, rng, layout=layout))
        return prompts, np.stack(imgs)
    raise ValueError(world)


class Scorer:
    def __init__(self, world: str, threads: int = 2):
        self.world = world
        self.threads = threads
        self._ocr = None

    def __call__(self, images: np.ndarray, metas: list[dict]) -> dict:
        if self.world == "text":
            from dgpo_bench_tasks.ocr_engine import RapidOCRReader
            from dgpo_bench_tasks.text import exact_match, ocr_similarity

            if self._ocr is None:
                self._ocr = RapidOCRReader(num_threads=self.threads)
            txt = []
            for i in range(0, len(images), 16):
                txt += self._ocr.read(list(images[i:i + 16]))
            sc = [ocr_similarity(t, m["target"]) for t, m in zip(txt, metas)]
            em = [float(exact_match(t, m["target"])) for t, m in zip(txt, metas)]
            return {"score": float(np.mean(sc)), "exact": float(np.mean(em)), "texts": txt,
                    "scores": sc}
        from dgpo_bench_tasks.shapes import check_scene

        sc = [check_scene(im, m["scene"]) for im, m in zip(images, metas)]
        return {"score": float(np.mean(sc)), "exact": float(np.mean([s >= 1.0 for s in sc])),
                "scores": sc}


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_batch(world: str, rng: np.random.Generator, n: int, cond_dropout: float,
                   layout: str) -> tuple[list[str], torch.Tensor]:
    """(prompts, each emptied with probability ``cond_dropout``; images in [-1, 1])."""
    prompts, imgs = sample_batch(world, rng, n, layout)
    drop = rng.random(n) < cond_dropout
    return ["" if d else p for p, d in zip(prompts, drop)], to_tensor(imgs)


class StepBatches(torch.utils.data.Dataset):
    """Batch ``i`` of a run, drawn from an rng seeded by (seed, i): the stream does not
    depend on how many worker processes render it, and resuming needs no rng state."""

    def __init__(self, world: str, seed: int, batch_size: int, cond_dropout: float, layout: str):
        self.world, self.seed, self.batch_size = world, seed, batch_size
        self.cond_dropout, self.layout = cond_dropout, layout

    def __getitem__(self, i: int):
        return training_batch(self.world, np.random.default_rng([self.seed, i]), self.batch_size,
                              self.cond_dropout, self.layout)


def grid(images: np.ndarray, cols: int = 4) -> np.ndarray:
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + 2), cols * (w + 2), c), 255, np.uint8)
    for i, im in enumerate(images):
        r, cc = divmod(i, cols)
        out[r * (h + 2):r * (h + 2) + h, cc * (w + 2):cc * (w + 2) + w] = im
    return out


@torch.no_grad()
def evaluate(model: NanoModel, world: str, n: int = 256, seed: int = 1000, batch: int = 64,
             guidance_scale: float | None = None, num_steps: int | None = None,
             autocast: bool = False, scorer: Scorer | None = None, return_images: bool = False,
             split: str = "eval") -> dict:
    from dgpo_bench_tasks import load_prompts

    items = load_prompts(world, split)[:n]
    scorer = scorer or Scorer(world)
    model.eval()
    imgs = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = generate(model, [it["prompt"] for it in chunk], seed=seed + i,
                     guidance_scale=guidance_scale, num_steps=num_steps, autocast=autocast)
        imgs.append(to_uint8(x))
    imgs = np.concatenate(imgs)
    res = scorer(imgs, [it["metadata"] for it in items])
    res["n"] = len(items)
    if return_images:
        res["images"] = imgs
        res["prompts"] = [it["prompt"] for it in items]
    return res


# ----------------------------------------------------------------------------- training
def pretrain(world: str, out: str | Path, steps: int = 5000, seed: int = 0, batch_size: int = 32,
             lr: float = 1e-3, warmup: int = 200, ema_decay: float = 0.999, grad_clip: float = 1.0,
             cond_dropout: float = 0.1, bf16: bool | None = None, threads: int = 2,
             eval_every: int = 250, eval_n: int = 256, eval_start: int = 1500, eval_n_early: int = 64,
             guidance_scale: float | None = None, resume: bool = False, keep_states: int = 1,
             ema_warmup: bool = True, reset_ema: bool = False, layout: str = "varied",
             quote_max_len: int = 0, device: str = "cpu", workers: int = 0, arch: dict | None = None,
             timestep_shift: float = 1.0, init: str | Path | None = None,
             argv: list[str] | None = None) -> Path:
    """Train; ``workers`` > 0 renders batches in that many processes (``StepBatches``'
    per-step stream) instead of from the run's single rng, for a GPU the renderer would starve.
    ``arch`` overrides the world's architecture fields of ``NanoConfig`` (e.g. ``patch_size``).
    ``timestep_shift`` moves the logit-normal sigmas towards noise as SD3 does for larger
    images (``shift s / (1 + (shift - 1) s)``) and becomes the checkpoint's sampling shift.
    ``init``, a nano weights folder of the same architecture, starts the weights and EMA there.
    ``argv``, the command-line arguments that asked for this run, is recorded in run.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if bf16 is None:
        bf16 = dev.type == "cpu" and cpu_info()["native_bf16"]
    cfg = dataclasses.replace(world_config(world, quote_max_len), **(arch or {}))
    cfg.cond_dropout = cond_dropout
    if guidance_scale is not None:
        cfg.guidance_scale = guidance_scale
    cfg.shift = timestep_shift

    torch.manual_seed(seed)
    random.seed(seed)
    model = NanoModel(cfg).to(dev)
    if init is not None:
        model.load_state_dict(load_nano(init).state_dict())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    step, train_seconds = 0, 0.0
    log_path = out / "log.jsonl"

    if resume:
        states = sorted(out.glob("ckpt_*/state.pt"))
        if states:
            st = torch.load(states[-1], map_location="cpu", weights_only=False)
            model.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
            rng.bit_generator.state = st["np_rng"]
            gen.set_state(st["torch_gen"])
            torch.set_rng_state(st["torch_rng"])
            step, train_seconds = st["step"], st["train_seconds"]
            log(f"resumed from {states[-1]} at step {step}")
            if reset_ema:
                ema.load_state_dict(model.state_dict())
                log("EMA reset to the current weights")
    if step == 0 and log_path.exists():
        log_path.unlink()
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    run_info = {"world": world, "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                "warmup": warmup, "ema_decay": ema_decay, "grad_clip": grad_clip,
                "cond_dropout": cond_dropout, "ema_warmup": ema_warmup, "reset_ema": reset_ema,
                "layout": layout, "quote_max_len": quote_max_len, "bf16": bf16, "threads": threads,
                "device": str(dev), "workers": workers, "arch": arch or {},
                "timestep_shift": timestep_shift, "init": str(init) if init is not None else None,
                "eval_every": eval_every, "eval_n": eval_n, "argv": argv}
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    log(f"world={world} params={model.num_parameters()/1e6:.3f}M bf16={bf16} threads={threads} "
        f"device={dev} workers={workers} steps={steps} out={out}")

    scorer = Scorer(world, threads)
    ema_params = [p for p in ema.parameters()]
    model_params = [p for p in model.parameters()]
    losses: list[float] = []
    t_last = time.time()
    batches = None
    if workers:
        batches = iter(torch.utils.data.DataLoader(
            StepBatches(world, seed, batch_size, cond_dropout, layout),
            batch_size=None, sampler=range(step, steps), num_workers=workers, prefetch_factor=4))
    model.train()
    while step < steps:
        t0 = time.time()
        if batches is not None:
            prompts, x0 = next(batches)
        else:
            prompts, x0 = training_batch(world, rng, batch_size, cond_dropout, layout)
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(batch_size, generator=gen))
        s = timestep_shift * s / (1 + (timestep_shift - 1) * s)
        x0, eps, s = x0.to(dev), eps.to(dev), s.to(dev)
        sv = s.view(-1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * eps
        target = eps - x0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            ehs, pooled = model.encode(prompts)
            v = model(xt, s, ehs, pooled)
        loss = torch.nn.functional.mse_loss(v.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        # EMA with warm-up (decay (1+n)/(10+n) capped at ema_decay) so that early
        # checkpoints are not dominated by the random initialisation
        decay = min(ema_decay, (1.0 + step) / (10.0 + step)) if ema_warmup else ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        step += 1
        train_seconds += time.time() - t0
        losses.append(loss.item())
        if step % 50 == 0:
            dt = (time.time() - t_last) / 50
            t_last = time.time()
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{dt*1000:.0f} ms/step train_min {train_seconds/60:.1f}")
        if step % eval_every == 0 or step == steps:
            n = eval_n if step >= eval_start or step == steps else eval_n_early
            te = time.time()
            res = evaluate(ema, world, n=n, autocast=bf16, scorer=scorer, return_images=True)
            eval_s = time.time() - te
            ck = out / f"ckpt_{step:06d}"
            save_nano(ema, ck)
            from PIL import Image

            Image.fromarray(grid(res["images"][:16], 2 if world == "text" else 4)).save(ck / "samples.png")
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "np_rng": rng.bit_generator.state,
                        "torch_gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "step": step, "train_seconds": train_seconds}, ck / "state.pt")
            old = sorted(out.glob("ckpt_*/state.pt"))[:-keep_states]
            for o in old:
                o.unlink()
            rec = {"step": step, "loss": float(np.mean(losses[-100:])), "eval_score": res["score"],
                   "eval_exact": res["exact"], "eval_n": res["n"], "train_minutes": train_seconds / 60,
                   "eval_seconds": eval_s, "time": time.time()}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"EVAL step {step} score {res['score']:.3f} exact {res['exact']:.3f} n {res['n']} "
                f"({eval_s:.0f}s) -> {ck}")
            model.train()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=["text", "shapes"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda); the weights load on CPU either way")
    ap.add_argument("--workers", type=int, default=0,
                    help="render batches in this many processes (a per-step data stream; 0: in-process, the shipped recipe)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=256)
    ap.add_argument("--eval-start", type=int, default=1500)
    ap.add_argument("--eval-n-early", type=int, default=64)
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                    help="plain EMA from step 0 (default: decay min(ema_decay, (1+n)/(10+n)))")
    ap.add_argument("--reset-ema", action="store_true", help="on --resume, restart the EMA from the current weights")
    ap.add_argument("--layout", "--text-layout", dest="layout", choices=["varied", "simple"], default="varied",
                    help="how the world draws its targets: random or fixed sizes and places "
                         "(dgpo_bench_tasks.text.LAYOUTS, dgpo_bench_tasks.shapes.render_scene)")
    ap.add_argument("--quote-max-len", type=int, default=0,
                    help="text world: embed the quoted target's character positions, up to this length (0: off)")
    ap.add_argument("--patch-size", type=int, help="pixels per token side (default 4)")
    ap.add_argument("--layers", type=int, help="MM-DiT blocks (default 4)")
    ap.add_argument("--heads", type=int, help="attention heads of 64 dims; the width is 64 x heads (default 2)")
    ap.add_argument("--timestep-shift", type=float, default=1.0,
                    help="shift the training sigmas towards noise (SD3's resolution shift; also the sampling shift)")
    ap.add_argument("--init", help="start from this nano weights folder (same world and architecture)")
    a = ap.parse_args(argv)
    arch = {field: getattr(a, flag) for field, flag in ARCH_FLAGS.items() if getattr(a, flag) is not None}
    if any(v < 1 for v in arch.values()):
        ap.error("--patch-size, --layers and --heads must be positive")
    default = world_config(a.world)
    saved = Path(a.out) / "config.json"
    if a.resume and saved.is_file():  # a resumed run keeps its architecture
        before = NanoConfig.from_dict(json.loads(saved.read_text()))
        # flags left out keep the run's values; the quote length always counts (its default is 0)
        clash = shape_clash(before, dataclasses.replace(before, **arch, quote_max_len=a.quote_max_len))
        if clash:
            ap.error(f"{a.out} was pretrained with " + ", ".join(f"{k}={getattr(before, k)}" for k in clash)
                     + "; resume with the same architecture flags or pass another --out")
        arch = {k: getattr(before, k) for k in ARCH_FLAGS if getattr(before, k) != getattr(default, k)}
    cfg = dataclasses.replace(default, **arch)
    if not cfg.patch_tiles_canvas:
        ap.error(f"--patch-size must divide the {a.world} world's {cfg.height}x{cfg.width} canvas")
    if a.quote_max_len < 0:
        ap.error("--quote-max-len must be 0 (off) or a positive length")
    if a.timestep_shift <= 0:
        ap.error("--timestep-shift must be positive (1: no shift)")
    if a.init is not None:
        init_cfg = Path(a.init) / "config.json"
        if not init_cfg.is_file():
            ap.error(f"--init {a.init} is not a nano weights folder (no config.json); pass a ckpt_* or weights folder")
        got = NanoConfig.from_dict(json.loads(init_cfg.read_text()))
        clash = shape_clash(got, dataclasses.replace(cfg, quote_max_len=a.quote_max_len))
        if clash:
            ap.error(f"--init {a.init} has " + ", ".join(f"{k}={getattr(got, k)}" for k in clash)
                     + "; pass weights of the same world and architecture")
    if a.workers < 0:
        ap.error("--workers must be 0 (render in this process) or a positive number of processes")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        ap.error(f"--device {a.device!r} is not a torch device; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA build of torch and a visible GPU; use --device cpu here")
    bf16 = {"auto": None, "on": True, "off": False}[a.bf16]
    pretrain(a.world, a.out, steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr,
             warmup=a.warmup, ema_decay=a.ema_decay, cond_dropout=a.cond_dropout, bf16=bf16,
             threads=a.threads, eval_every=a.eval_every, eval_n=a.eval_n, eval_start=a.eval_start, eval_n_early=a.eval_n_early,
             guidance_scale=a.guidance_scale, resume=a.resume,
             ema_warmup=a.ema_warmup, reset_ema=a.reset_ema, layout=a.layout,
             quote_max_len=a.quote_max_len, device=device, workers=a.workers, arch=arch,
             timestep_shift=a.timestep_shift, init=a.init,
             argv=list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
