"""Registers the first-party objectives and their presets."""

from __future__ import annotations

import dgpo_bench

from .dgpo import Dgpo
from .diffusion_dpo import DiffusionDpo
from .flow_grpo import FlowGrpo
from .presets import NANO, PUBLISHED


@dgpo_bench.hookimpl
def register_objectives(register):
    register(Dgpo)
    register(FlowGrpo)
    register(DiffusionDpo)


@dgpo_bench.hookimpl
def register_presets(register):
    for name, (spec, description) in {**PUBLISHED, **NANO}.items():
        register(name, spec, description)
