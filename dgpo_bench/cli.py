"""The ``dgpo-bench`` command line; the one place user errors become messages.

stdout carries only results (tables, or JSON with ``--json``); progress and
messages go to stderr. User errors print one sentence and exit with code 2.
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import DgpoBenchError, PluginLoadError
from .plugins import Components, get_plugin_manager, load_components, plugins_dirs_from_env

out = Console()
err = Console(stderr=True)


class State:
    debug = False
    strict_plugins = False
    pm = None
    _components: Components | None = None

    def components(self) -> Components:
        if self._components is None:
            self._components = load_components(self.pm)
        if self.strict_plugins and self._components.failures:
            f = self._components.failures[0]
            raise PluginLoadError(f"Plugin '{f.plugin}' failed to load ({f.error}); fix or uninstall it, "
                                  "or drop --strict-plugins.")
        return self._components


state = State()


def _version(value: bool) -> None:
    if value:
        out.print(f"dgpo-bench {__version__}")
        raise typer.Exit()


def build_app(pm) -> typer.Typer:
    """The typer app over plugin manager ``pm`` (plugins may add commands)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Head-to-head comparisons of reward fine-tuning objectives for flow models.")
    state.pm, state._components = pm, None

    @app.callback()
    def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
              strict_plugins: bool = typer.Option(False, "--strict-plugins",
                                                  help="Fail when any plugin fails to load."),
              version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the version.")) -> None:
        state.debug, state.strict_plugins = debug, strict_plugins

    from .commands import register_core_commands

    register_core_commands(app, state)
    pm.hook.register_commands(app=app)
    return app


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point: build the plugin manager, run the app, convert errors once."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        pm = get_plugin_manager(plugins_dirs=plugins_dirs_from_env(), strict="--strict-plugins" in argv)
        app = build_app(pm)
        code = app(args=argv, prog_name="dgpo-bench", standalone_mode=False)
        if code == 130:  # typer (non-standalone) turns Ctrl-C into this exit code
            err.print("Interrupted; results written so far are kept (rerun the same command to resume).")
        return code if isinstance(code, int) else 0
    except DgpoBenchError as exc:
        if debug:
            raise
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("Aborted.")
        return 130
    except typer.TyperException as exc:  # usage errors (typer's own copy of click's exceptions)
        exc.show()
        return 2
    except KeyboardInterrupt:
        err.print("Interrupted; results written so far are kept (rerun the same command to resume).")
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Shut down torch.distributed (under ``accelerate launch``): exiting with gloo up can abort."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def timestamped_dir(base: str, label: str) -> Path:
    return Path(base) / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{label}"


def results_table(title: str, base: dict[str, float], tuned: dict[str, float],
                  higher: dict[str, bool]) -> Table:
    table = Table(title=title)
    table.add_column("reward (held-out)")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("change", justify="right")
    for name, b in base.items():
        t = tuned.get(name, float("nan"))
        delta = t - b
        good = delta > 0 if higher.get(name, True) else delta < 0
        table.add_row(name, f"{b:.4f}", f"{t:.4f}", f"[{'green' if good else 'red'}]{delta:+.4f}[/]")
    return table


if __name__ == "__main__":
    sys.exit(main())
