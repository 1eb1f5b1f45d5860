"""Pretraining helpers: the per-step batch stream used with --workers, and the command
that PRETRAIN.md prints to reproduce a shipped checkpoint."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from dgpo_bench_backbones.nano.export import reproduce_args, write_pretrain_md
from dgpo_bench_backbones.nano.pretrain import StepBatches, main


def test_step_batches_depend_only_on_seed_and_step():
    ds = StepBatches("text", seed=3, batch_size=6, cond_dropout=0.5, layout="simple")
    p4, x4 = ds[4]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(3, 6), num_workers=2)
    batches = list(loader)
    assert batches[1][0] == p4 and torch.equal(batches[1][1], x4)  # a worker renders the same batch 4
    assert x4.shape == (6, 3, 32, 128) and x4.min() >= -1 and x4.max() <= 1
    assert "" in p4 and any(p for p in p4)  # dropout 0.5 empties some prompts, not all
    other = StepBatches("text", seed=4, batch_size=6, cond_dropout=0.5, layout="simple")[4]
    assert not torch.equal(other[1], x4)


def test_layout_flag_reaches_the_shapes_world():
    """--layout simple draws shapes-world targets in the fixed slots, not at random places."""
    varied, simple = (StepBatches("shapes", seed=0, batch_size=32, cond_dropout=0.0, layout=lay)[0][1]
                      for lay in ("varied", "simple"))
    ink = lambda x: (x < 0.99).any(1).any(0)  # noqa: E731  (any image's non-white pixels, H x W)
    assert not ink(simple)[:5].any() and ink(varied)[:5].any()


def test_reproduce_args_pins_out_and_steps():
    argv = ["--world", "text", "--steps", "100000", "--out", "/tmp/runs/s128", "--batch-size", "128", "--resume"]
    assert reproduce_args(argv, Path("runs/gpu/s128"), 3500) == (
        "--world text --batch-size 128 --out runs/gpu/s128 --steps 3500")


def test_worker_fed_pretraining_resumes_onto_the_same_stream(tmp_path):
    args = ["--world", "text", "--seed", "0", "--batch-size", "4", "--workers", "1", "--threads", "1",
            "--eval-every", "2", "--eval-n", "4", "--eval-n-early", "4", "--bf16", "off"]
    main([*args, "--out", str(tmp_path / "a"), "--steps", "4"])
    main([*args, "--out", str(tmp_path / "b"), "--steps", "2"])
    main([*args, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"])
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "ckpt_000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt_000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["argv"] == [*args, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"]


def test_architecture_flags_change_the_model_and_are_checked(tmp_path, capsys):
    from dgpo_bench_backbones.nano.model import load_nano

    main(["--world", "text", "--seed", "0", "--batch-size", "2", "--threads", "1", "--steps", "1",
          "--eval-every", "1", "--eval-n", "2", "--eval-n-early", "2", "--bf16", "off",
          "--patch-size", "8", "--layers", "2", "--out", str(tmp_path / "p8")])
    model = load_nano(tmp_path / "p8" / "ckpt_000001")
    assert (model.config.patch_size, model.config.num_layers) == (8, 2)
    assert model.transformer.pos_embed.proj.kernel_size == (8, 8) and len(model.transformer.transformer_blocks) == 2
    assert json.loads((tmp_path / "p8" / "run.json").read_text())["arch"] == {"patch_size": 8, "num_layers": 2}
    with pytest.raises(SystemExit):
        main(["--world", "text", "--patch-size", "5", "--out", str(tmp_path / "bad")])
    assert "--patch-size must divide the text world's 32x128 canvas" in capsys.readouterr().err


def test_resume_keeps_the_architecture_and_refuses_another(tmp_path, capsys):
    args = ["--world", "text", "--seed", "0", "--batch-size", "2", "--threads", "1", "--eval-every", "1",
            "--eval-n", "2", "--eval-n-early", "2", "--bf16", "off", "--out", str(tmp_path)]
    main([*args, "--steps", "1", "--layers", "1"])
    main([*args, "--steps", "2", "--resume"])  # no flag: the run's own single block
    assert json.loads((tmp_path / "ckpt_000002" / "config.json").read_text())["num_layers"] == 1
    with pytest.raises(SystemExit):
        main([*args, "--steps", "3", "--resume", "--layers", "2"])
    assert "was pretrained with num_layers=1; resume with the same architecture flags" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--steps", "3", "--resume", "--quote-max-len", "4"])
    assert "was pretrained with quote_max_len=0; resume with the same architecture flags" in capsys.readouterr().err


def test_init_and_timestep_shift_start_from_weights_and_set_the_sampling_shift(tmp_path, capsys):
    from safetensors.torch import load_file

    args = ["--world", "text", "--seed", "0", "--batch-size", "2", "--threads", "1", "--eval-every", "1",
            "--eval-n", "2", "--eval-n-early", "2", "--bf16", "off", "--layers", "1"]
    main([*args, "--steps", "1", "--out", str(tmp_path / "a")])
    main([*args, "--steps", "1", "--lr", "0", "--timestep-shift", "3", "--init", str(tmp_path / "a" / "ckpt_000001"),
          "--out", str(tmp_path / "b")])
    a = load_file(str(tmp_path / "a" / "ckpt_000001" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt_000001" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the EMA of the initial weights
    assert json.loads((tmp_path / "b" / "ckpt_000001" / "config.json").read_text())["shift"] == 3.0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["init"] == str(tmp_path / "a" / "ckpt_000001")
    shutil.copytree(tmp_path / "b" / "ckpt_000001", tmp_path / "ship")
    write_pretrain_md(tmp_path / "ship", tmp_path / "b" / "ckpt_000001",
                      {"score": 0.5, "exact": 0.1, "n": 2, "ceiling": {"score": 1.0, "exact": 1.0}, "sample_prompts": []})
    assert ("nano.pretrain --world text --seed 0 --batch-size 2 --threads 1" in
            (tmp_path / "ship" / "PRETRAIN.md").read_text())  # the reproducing command keeps every flag
    with pytest.raises(SystemExit):
        main([*args[:-2], "--steps", "1", "--init", str(tmp_path / "a" / "ckpt_000001"), "--out", str(tmp_path / "c")])
    assert "has num_layers=1; pass weights of the same world and architecture" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the text encoder's quote embeddings are part of the weights too
        main([*args, "--steps", "1", "--quote-max-len", "4", "--init", str(tmp_path / "a" / "ckpt_000001"),
              "--out", str(tmp_path / "c")])
    assert "has quote_max_len=0; pass weights of the same world and architecture" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--timestep-shift", "0", "--out", str(tmp_path / "d")])
    assert "--timestep-shift must be positive" in capsys.readouterr().err
