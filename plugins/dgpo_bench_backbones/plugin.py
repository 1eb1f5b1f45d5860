"""First-party backbones: ``nano`` (ships with the package) and ``sd3`` (a local diffusers folder)."""

from __future__ import annotations

import typer

import dgpo_bench

from .nano.backbone import NanoBackbone
from .sd3 import SD3Backbone


@dgpo_bench.hookimpl
def register_backbones(register):
    register(NanoBackbone)
    register(SD3Backbone)


@dgpo_bench.hookimpl
def register_commands(app):
    @app.command("pretrain-nano", add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def pretrain_nano(ctx: typer.Context) -> None:
        """Pretrain a nano checkpoint from a seed (arguments as 'pretrain-nano --help' lists)."""
        from .nano.pretrain import main

        main(ctx.args)
