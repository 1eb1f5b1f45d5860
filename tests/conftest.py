"""Shared test setup: offline hubs, few threads, a fresh plugin manager per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def components():
    """Components from the installed plugins, loaded afresh for this test."""
    from dgpo_bench.plugins import get_plugin_manager, load_components

    return load_components(get_plugin_manager())
