"""Shared test setup: offline hubs, few threads, a fresh plugin manager per test."""

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Small models on a shared 2-core machine: one thread per process avoids oversubscription
# (subprocesses started by tests inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# nano compiles its denoiser by default, tens of seconds per model shape; the suite runs it eager
# (torch's own switch, inherited by subprocesses) and tests/test_compile.py turns compilation back on.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def components():
    """Components from the installed plugins, loaded afresh for this test."""
    from dgpo_bench.plugins import get_plugin_manager, load_components

    return load_components(get_plugin_manager())


ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (scripts, not an importable package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

TINY_NANO = dict(world="text", height=16, width=32, patch_size=4, num_layers=2, num_attention_heads=2,
                 attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=32, text_max_len=12,
                 text_layers=1, text_ff_mult=2)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A small randomly initialised nano checkpoint (the real model class, tiny sizes)."""
    from dgpo_bench_backbones.nano.model import NanoConfig, NanoModel, save_nano

    torch.manual_seed(0)
    model = NanoModel(NanoConfig(**TINY_NANO))
    with torch.no_grad():  # adaLN-zero output layers start at zero; give them weights
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("tiny-nano") / "weights"
    save_nano(model, path)
    return path


@pytest.fixture
def sharpness_plugin(tmp_path, monkeypatch):
    """The example third-party reward ('sharpness') as a one-off plugin file; returns its folder.
    It varies on a random tiny model, where OCR reads nothing and advantages would be 0."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(ROOT / "examples/dgpo-bench-sharpness/dgpo_bench_sharpness/__init__.py", plugins / "sharpness.py")
    monkeypatch.setenv("DGPO_BENCH_PLUGINS_DIR", str(plugins))
    return plugins
