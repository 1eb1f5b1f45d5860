"""Evaluate pretraining checkpoints and ship one as the packaged nano weights.

    # score candidate checkpoints on held-out prompts (default eval settings of config.json)
    python -m dgpo_bench_backbones.nano.export eval runs/pretrain/text_s0/ckpt_003500 --n 512
    # copy one (EMA weights + config) to weights/<world>/ with samples.png and eval.json
    python -m dgpo_bench_backbones.nano.export ship runs/pretrain/text_s0/ckpt_003500 --n 512
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .model import default_weights_dir, load_nano, save_nano
from .pretrain import Scorer, evaluate, grid


def ground_truth(world: str, items: list[dict], seed: int, layout: str = "varied") -> np.ndarray:
    """uint8 renders of the prompts' targets (quoted text or scene), drawn from one rng."""
    rng = np.random.default_rng(seed)
    if world == "text":
        from dgpo_bench_tasks.text import render_text

        return np.stack([render_text(it["metadata"]["target"], rng, layout=layout) for it in items])
    from dgpo_bench_tasks.shapes import render_scene

    return np.stack([render_scene(it["metadata"]["scene"], rng, train_only_colors=False, layout=layout)
                     for it in items])


def read_run(run_dir: Path) -> dict:
    """A pretraining run's run.json ({} for a folder without one)."""
    f = Path(run_dir) / "run.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def run_layout(run: dict) -> str:
    """The layout a pretraining run drew its targets in (run.json; ``text_layout`` before 2026-11-27)."""
    return run.get("layout", run.get("text_layout", "varied"))


def ceiling(world: str, n: int = 512, seed: int = 0, layout: str = "varied") -> dict:
    """Score of ground-truth renders of the held-out prompts (reward ceiling)."""
    from dgpo_bench_tasks import load_prompts

    items = load_prompts(world, "eval")[:n]
    res = Scorer(world)(ground_truth(world, items, seed, layout), [it["metadata"] for it in items])
    return {"score": res["score"], "exact": res["exact"], "n": len(items)}


def eval_ckpt(path: str | Path, n: int = 512, seed: int = 1000, threads: int = 2, autocast: bool = False,
              guidance_scale: float | None = None, return_images: bool = False) -> dict:
    torch.set_num_threads(threads)
    model = load_nano(path)
    world = model.config.world
    t = time.time()
    res = evaluate(model, world, n=n, seed=seed, autocast=autocast, scorer=Scorer(world, threads),
                   guidance_scale=guidance_scale, return_images=return_images)
    res["seconds"] = time.time() - t
    res["guidance_scale"] = model.config.guidance_scale if guidance_scale is None else guidance_scale
    res["num_steps"] = model.config.num_inference_steps
    res["checkpoint"] = str(path)
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def reproduce_args(argv: list[str], run_dir: Path, step: int) -> str:
    """The run's recorded arguments with ``--out`` set to its folder and ``--steps`` to ``step``."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--steps", "--resume"):
            skip = a != "--resume"
        else:
            args.append(a)
    return " ".join(args + ["--out", str(run_dir), "--steps", str(step)])


NOTES = """The 2-core machine was shared with other jobs, so minutes are not comparable to an idle
machine; budget in steps."""


def write_pretrain_md(dst: Path, ckpt: Path, summary: dict, bench_res: dict | None = None,
                      notes: str = NOTES) -> None:
    run_dir = ckpt.parent
    step = int(ckpt.name.split("_")[-1])
    log = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()] \
        if (run_dir / "log.jsonl").exists() else []
    run = read_run(run_dir)
    rec = next((r for r in log if r["step"] == step), {})
    cfg = json.loads((dst / "config.json").read_text())
    lines = [
        f"# Nano backbone, {cfg['world']} world: pretraining record", "",
        f"Shipped weights: EMA weights of `{ckpt}` (step {step}), copied by",
        f"`python -m dgpo_bench_backbones.nano.export ship {ckpt} --n {summary['n']}`.", "",
        "## Command", "",
        "```",
        f"python -m dgpo_bench_backbones.nano.pretrain {reproduce_args(run.get('argv', []), run_dir, step)}",
        "```", "",
        "(the learning rate is constant after warm-up and the data stream does not depend on `--steps`, "
        "so stopping a longer run at this step gives the same weights; last invocation: "
        f"`python -m dgpo_bench_backbones.nano.pretrain {' '.join(run.get('argv', []))}`)", "",
        notes, "",
        "## Facts", "",
        f"- seed {run.get('seed', 0)}, batch {run.get('batch_size', 32)}, AdamW lr {run.get('lr')} "
        f"(warmup {run.get('warmup')}), EMA {run.get('ema_decay')} (warm-up {run.get('ema_warmup')}), "
        f"condition dropout {run.get('cond_dropout')}, bf16 autocast {run.get('bf16')}, "
        f"layout {run_layout(run)}, quote embedding {run.get('quote_max_len', 0)}",
        f"- steps {step}; training minutes {rec.get('train_minutes', float('nan')):.1f} "
        f"(train loss, last 100 steps: {rec.get('loss', float('nan')):.4f})",
        (f"- trained on {run.get('device')} with {run.get('workers')} data worker process(es); "
         "evaluated below on the CPU" if run.get("device", "cpu") != "cpu" else
         f"- CPU: {_cpu_name()}, {run.get('threads')} torch thread(s), shared with other jobs"),
        f"- architecture: {cfg['num_layers']} MM-DiT blocks of width "
        f"{cfg['num_attention_heads'] * cfg['attention_head_dim']} ({cfg['num_attention_heads']} heads), "
        f"patch {cfg['patch_size']} ({cfg['height'] // cfg['patch_size']}x{cfg['width'] // cfg['patch_size']} "
        f"image tokens), {cfg['text_max_len']} text tokens",
        f"- parameters: {load_nano(dst).num_parameters() / 1e6:.3f}M; "
        f"file size {(dst / 'model.safetensors').stat().st_size / 1e6:.1f} MB (bf16)",
        f"- default inference: {cfg['num_inference_steps']} Euler steps (diffusers "
        f"FlowMatchEulerDiscreteScheduler, shift {cfg['shift']}), CFG {cfg['guidance_scale']} with \"\"", "",
        "## Held-out evaluation of the shipped weights", "",
        f"- base score (mean reward): **{summary['score']:.3f}** on {summary['n']} held-out prompts "
        f"(noise seed 1000, fp32)",
        f"- {'exact-match rate' if cfg['world'] == 'text' else 'fully-correct rate (GenEval strict)'}: "
        f"{summary['exact']:.3f}",
        f"- ceiling (ground-truth renders of the same prompts): score {summary['ceiling']['score']:.3f}, "
        f"exact {summary['ceiling']['exact']:.3f}",
        "- `samples.png`: the first 16 held-out prompts (row-major):", "",
    ]
    lines += [f"  {i + 1}. {p}" for i, p in enumerate(summary.get("sample_prompts", []))]
    lines += ["", f"## Eval log of the run (periodic, EMA weights, {'bf16' if run.get('bf16') else 'fp32'}, n prompts each)", "",
              "| step | train min | loss | score | exact | n |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['train_minutes']:.1f} | {r['loss']:.4f} | {r['eval_score']:.3f} | "
              f"{r['eval_exact']:.3f} | {r['eval_n']} |" for r in log]
    if bench_res:
        lines += ["", "## Speed (this machine)", "", "```", json.dumps(bench_res, indent=2), "```"]
    (dst / "PRETRAIN.md").write_text("\n".join(lines) + "\n")


def ship(path: str | Path, n: int = 512, threads: int = 2, with_bench: bool = False, notes: str = NOTES) -> Path:
    path = Path(path)
    model = load_nano(path)
    world = model.config.world
    dst = default_weights_dir(world)
    dst.mkdir(parents=True, exist_ok=True)
    # EMA weights in bf16 (half the size; evaluated below exactly as shipped)
    save_nano(model, dst, dtype=torch.bfloat16)
    res = eval_ckpt(dst, n=n, threads=threads, return_images=True)
    from PIL import Image

    Image.fromarray(grid(res["images"][:16], 2 if world == "text" else 4)).save(dst / "samples.png")
    summary = {k: res[k] for k in ("score", "exact", "n", "guidance_scale", "num_steps", "seconds")}
    summary["source_checkpoint"] = str(path)
    summary["ceiling"] = ceiling(world, n=n, layout=run_layout(read_run(path.parent)))
    summary["sample_prompts"] = res["prompts"][:16]
    bench_res = bench(dst, threads=threads) if with_bench else None
    if bench_res:
        summary["bench"] = bench_res
    (dst / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_pretrain_md(dst, path, summary, bench_res, notes)
    print(json.dumps(summary, indent=2))
    return dst


def bench(path: str | Path, threads: int = 2, group: int = 16, repeats: int = 3) -> dict:
    """Wall-clock of one group (``group`` images, default steps, CFG) and of one training step."""
    torch.set_num_threads(threads)
    model = load_nano(path)
    prompts = [it["prompt"] for it in __import__("dgpo_bench_tasks").load_prompts(model.config.world, "eval")[:group]]
    out = {"threads": threads, "group": group, "num_steps": model.config.num_inference_steps,
           "guidance_scale": model.config.guidance_scale}
    for ac in (False, True):
        kind = "bf16" if ac else "fp32"
        out["group_seconds_" + kind], out["train_step_bs32_seconds_" + kind] = time_nano(model, prompts, repeats, ac)
    return out


def time_nano(model, prompts: list[str], repeats: int, autocast: bool) -> tuple[float, float]:
    """Best of ``repeats`` seconds of one group (``prompts``, default steps and CFG) and of one
    AdamW training step on a batch of 32, each after one untimed warm-up."""
    from .model import generate

    model.eval()
    generate(model, prompts[:2], autocast=autocast)
    group = min(_seconds(lambda r=r: generate(model, prompts, seed=r, autocast=autocast)) for r in range(repeats))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cfg = model.config
    x0 = torch.randn(32, cfg.channels, cfg.height, cfg.width, generator=torch.Generator().manual_seed(0))
    batch = (prompts * (32 // len(prompts) + 1))[:32]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ehs, pooled = model.encode(batch)
            v = model(x0, torch.rand(32), ehs, pooled)
        loss = torch.nn.functional.mse_loss(v.float(), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    return group, min(_seconds(step) for _ in range(repeats))


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["eval", "ship", "ceiling", "bench"])
    ap.add_argument("paths", nargs="+", help="checkpoint dirs (or a world name for 'ceiling')")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--bench", action="store_true", help="ship: also time a 16-image group and a train step")
    ap.add_argument("--notes", default=NOTES, help="ship: the history of the run, for PRETRAIN.md")
    a = ap.parse_args(argv)
    for p in a.paths:
        if a.cmd == "eval":
            r = eval_ckpt(p, n=a.n, seed=a.seed, threads=a.threads, guidance_scale=a.guidance_scale)
            r.pop("texts", None), r.pop("scores", None)
            print(json.dumps(r), flush=True)
        elif a.cmd == "bench":
            print(json.dumps(bench(p, threads=a.threads)), flush=True)
        elif a.cmd == "ceiling":
            print(json.dumps({"world": p, **ceiling(p, n=a.n)}), flush=True)
        else:
            ship(p, n=a.n, threads=a.threads, with_bench=a.bench, notes=a.notes)


if __name__ == "__main__":
    main()
