"""Registers the first-party rewards and the ``serve-reward`` command (imports stay light)."""

from __future__ import annotations

import dgpo_bench

from .aesthetic import AestheticReward
from .clip_score import ClipScoreReward
from .compositional import CompositionalReward
from .ocr import OcrReward
from .pickscore import PickScoreRankReward, PickScoreReward
from .remote import RemoteReward

REWARDS = (OcrReward, CompositionalReward, PickScoreReward, PickScoreRankReward, AestheticReward,
           ClipScoreReward, RemoteReward)


@dgpo_bench.hookimpl
def register_rewards(register):
    for cls in REWARDS:
        register(cls)


@dgpo_bench.hookimpl
def register_commands(app):
    import typer

    @app.command("serve-reward")
    def serve_reward(
        name: str = typer.Argument(..., help="Installed reward to serve, e.g. ocr."),
        port: int = typer.Option(8765, "--port", help="Port on HOST; 0 picks a free one (printed)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
        device: str = typer.Option(None, "--device", help="Torch device for model-based rewards."),
        option: list[str] = typer.Option([], "-o", "--option", help="Reward option KEY=VALUE (repeatable)."),
    ) -> None:
        """Serve a reward over HTTP for the 'remote' reward (e.g. one whose dependencies live elsewhere)."""
        from .server import parse_options, serve

        serve(name, parse_options(option, name), host, port, device)
