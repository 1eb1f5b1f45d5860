"""Shared test setup: offline hubs, few threads, a fresh plugin manager per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Small models on a shared 2-core machine: one thread per process avoids oversubscription
# (subprocesses started by tests inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def components():
    """Components from the installed plugins, loaded afresh for this test."""
    from dgpo_bench.plugins import get_plugin_manager, load_components

    return load_components(get_plugin_manager())
