"""Speed of nano model variants side by side: one 16-image group and one training step.

    python benchmarks/nano_speed.py                                   # the shipped text model
    python benchmarks/nano_speed.py --variant patch_size=8 --variant num_layers=2
    python benchmarks/nano_speed.py --weights runs/pretrain/text_l2/ckpt_003500

For the shipped text model and each variant (the shipped config with one or more fields
changed, comma-separated, random weights) or checkpoint folder, prints the seconds of a
group of ``--group`` images sampled with the model's default steps and CFG (issue #3's
target: 1 s for 16 images, 10 steps) and of one training step (forward and backward of a
batch of 32, AdamW), best of ``--repeats``, with bf16 autocast as the backbone uses it on
this CPU, and each as a ratio to the shipped model measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dgpo_bench.errors import SpecError
from dgpo_bench.results import cpu_info
from dgpo_bench_backbones.nano.export import time_nano
from dgpo_bench_backbones.nano.model import NanoConfig, build_nano, default_weights_dir, load_nano


def parse_variant(text: str, base: dict) -> dict:
    """``"patch_size=8,num_layers=2"`` -> the base config with those integer fields changed."""
    fields = [k for k, v in base.items() if isinstance(v, int) and not isinstance(v, bool)]
    changes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields or not value.isdigit() or int(value) < 1:
            raise SpecError(f"Variant {item!r} is not FIELD=N with N >= 1 and FIELD one of {', '.join(fields)}.")
        changes[key] = int(value)
    cfg = {**base, **changes}
    if not NanoConfig.from_dict(cfg).patch_tiles_canvas:
        raise SpecError(f"Variant {text!r}: patch_size {cfg['patch_size']} does not tile the "
                        f"{cfg['height']}x{cfg['width']} canvas.")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], help="FIELD=N[,FIELD=N]: a changed config")
    parser.add_argument("--weights", action="append", default=[], help="a checkpoint folder to time")
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    autocast = cpu_info()["native_bf16"]
    shipped = default_weights_dir("text")
    base = json.loads((shipped / "config.json").read_text())
    try:
        models = [("shipped", load_nano(shipped))]
        models += [(v, build_nano(parse_variant(v, base))) for v in args.variant]
        for w in args.weights:
            if not (Path(w) / "config.json").is_file():
                raise SpecError(f"{w} is not a nano checkpoint folder (no config.json); pass one pretraining wrote.")
            models.append((w, load_nano(w)))
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = [f'a sign that says "word{i}"' for i in range(args.group)]
    print(f"{args.threads} threads, bf16 autocast {autocast}, group of {args.group}, best of {args.repeats}\n")
    print("| model | parameters | group s | ratio | train step s (batch 32) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = None
    for name, model in models:
        group, train = time_nano(model, prompts, args.repeats, autocast)
        ref = ref or (group, train)
        print(f"| {name} | {model.num_parameters() / 1e6:.2f}M | {group:.3f} | {group / ref[0]:.2f} "
              f"| {train:.3f} | {train / ref[1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
