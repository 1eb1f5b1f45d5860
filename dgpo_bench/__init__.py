"""dgpo-bench: controlled comparisons of reward fine-tuning objectives for flow models."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("dgpo_bench")
"""Decorator marking a plugin's implementation of a dgpo-bench hook."""

__all__ = ["__version__", "hookimpl"]
