"""First-party backbones: ``nano`` (ships with the package) and ``sd3`` (a local diffusers folder)."""

from __future__ import annotations

import dgpo_bench

from .nano.backbone import NanoBackbone
from .sd3 import SD3Backbone


@dgpo_bench.hookimpl
def register_backbones(register):
    register(NanoBackbone)
    register(SD3Backbone)
