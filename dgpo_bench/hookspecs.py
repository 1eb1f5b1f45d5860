"""Hook specifications: one registration hook per component kind, plus CLI commands.

Each ``register_*`` hook receives a ``register`` callable bound to the calling plugin;
call it once per class. Classes carry their own kebab-case ``name``. Heavy imports
belong in the component's ``load()``, never at plugin import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import typer

hookspec = pluggy.HookspecMarker("dgpo_bench")


@hookspec
def register_backbones(register: Callable[[type], None]) -> None:
    """Register ``Backbone`` subclasses (models that predict velocity and decode images)."""


@hookspec
def register_samplers(register: Callable[[type], None]) -> None:
    """Register ``Sampler`` subclasses (ODE/SDE integrators over a backbone)."""


@hookspec
def register_objectives(register: Callable[[type], None]) -> None:
    """Register ``Objective`` subclasses (one optimizer step on a batch of groups)."""


@hookspec
def register_rewards(register: Callable[[type], None]) -> None:
    """Register ``Reward`` subclasses (score images given their prompts)."""


@hookspec
def register_presets(register: Callable[[str, dict[str, Any], str], None]) -> None:
    """Register named partial run specs: ``register(name, spec_fragment, description)``.

    A preset sets objective options, samplers and group sizes in one flag
    (``--preset dgpo-ocr``); explicit flags still override it.
    """


@hookspec
def register_commands(app: "typer.Typer") -> None:
    """Add commands to the ``dgpo-bench`` CLI."""
