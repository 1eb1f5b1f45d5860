"""Registers the first-party samplers."""

from __future__ import annotations

import dgpo_bench

from .ode import DpmSolver, OdeEuler
from .sde import FlowSde


@dgpo_bench.hookimpl
def register_samplers(register):
    register(OdeEuler)
    register(DpmSolver)
    register(FlowSde)
