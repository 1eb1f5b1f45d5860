"""The core CLI commands: run, eval, plugins, validate, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from .resolve import build_spec, resolve
from .spec import load_file, parse_rewards


def _run_settings(objective, reward, backbone, sampler, eval_sampler, group_size, prompts_per_step,
                  updates_per_rollout, steps, seed, preset, eval_prompts, eval_every, config) -> dict[str, Any]:
    """The user's settings (file, then flags); unset flags leave file/preset/defaults alone."""
    user: dict[str, Any] = load_file(Path(config)) if config else {}
    refs = {"objective": objective, "backbone": backbone, "sampler": sampler}
    for role, name in refs.items():
        if name is not None:
            keep = user.get(role, {}).get("options", {}) if user.get(role, {}).get("name") == name else {}
            user[role] = {"name": name, "options": keep}
    if eval_sampler is not None:
        user.setdefault("eval", {})["sampler"] = {"name": eval_sampler}
    if reward is not None:
        user["rewards"] = parse_rewards(reward)
    for key, val in (("group_size", group_size), ("prompts_per_step", prompts_per_step),
                     ("updates_per_rollout", updates_per_rollout), ("seed", seed), ("preset", preset)):
        if val is not None:
            user[key] = val
    if steps is not None:
        user["budget"] = {"steps": steps, "seconds": None, "images": None, "reward_calls": None}
    if eval_prompts is not None:
        user.setdefault("eval", {})["prompts"] = eval_prompts
    if eval_every is not None:
        user.setdefault("eval", {})["every"] = eval_every
    return user


def register_core_commands(app: typer.Typer, state) -> None:
    from .cli import err, out, print_json, results_table, timestamped_dir

    @app.command()
    def run(
        objective: Optional[str] = typer.Option(None, "--objective", help="Objective, e.g. dgpo, flow-grpo."),
        reward: Optional[str] = typer.Option(None, "--reward", help="Training reward: 'ocr' or 'ocr=1,aesthetic=0.5'."),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone (default: nano)."),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="Rollout sampler (default: the objective's)."),
        eval_sampler: Optional[str] = typer.Option(None, "--eval-sampler", help="Evaluation sampler."),
        group_size: Optional[int] = typer.Option(None, "--group-size", help="Samples per prompt (G)."),
        prompts_per_step: Optional[int] = typer.Option(None, "--prompts-per-step", help="Groups per rollout."),
        updates_per_rollout: Optional[int] = typer.Option(
            None, "--updates-per-rollout", help="Optimizer steps per rollout, each on 1/k of its samples (default 1)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Budget in optimizer steps."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Run seed."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Named settings, e.g. dgpo-ocr."),
        eval_prompts: Optional[int] = typer.Option(None, "--eval-prompts", help="Held-out prompts to evaluate."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps."),
        config: Optional[Path] = typer.Option(None, "--config", help="TOML/JSON run spec file."),
        option: List[str] = typer.Option([], "-o", "--option", help="COMPONENT.KEY=VALUE, repeatable."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<time>-<name>)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Resolve and print the spec; build nothing."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    ) -> None:
        """Fine-tune a backbone with one objective and report held-out scores before and after."""
        comps = state.components()
        user = _run_settings(objective, reward, backbone, sampler, eval_sampler, group_size, prompts_per_step,
                             updates_per_rollout, steps, seed, preset, eval_prompts, eval_every, config)
        spec, notes = build_spec(comps, user, option, source=str(config) if config else "the command line")
        resolved = resolve(comps, spec, notes)
        for note in resolved.notes:
            err.print(f"[dim]{note}[/]")
        if dry_run:
            print_json(resolved.resolved_dict())
            return
        from .engine import Engine

        rs = resolved.spec
        label = f"{rs.objective.name}-{'+'.join(r.name for r in rs.rewards)}-s{rs.seed}"
        run_dir = out_dir or timestamped_dir("runs", label)
        engine = Engine(resolved, run_dir, plugin_versions=comps.versions)
        result = engine.run()
        if not engine.main:
            return
        if as_json:
            print_json({k: result[k] for k in ("run_dir", "base", "tuned", "cost", "steps", "higher_is_better")})
        else:
            out.print(results_table(f"{rs.objective.name} on {rs.backbone.name}: {result['steps']} steps, "
                                    f"{result['cost']['train_seconds']:.0f} s training",
                                    result["base"], result["tuned"], result["higher_is_better"]))
            out.print(f"results in {run_dir}")

    @app.command("eval")
    def eval_cmd(
        run_dir: Optional[Path] = typer.Argument(None, help="A run directory whose trained weights to score."),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone (default: the run's, or nano)."),
        reward: List[str] = typer.Option([], "--reward", help="Reward(s) to score; repeatable."),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="Evaluation sampler (default ode-euler)."),
        seed: List[int] = typer.Option([], "--seed", help="Evaluation noise seed(s); repeatable."),
        prompts: Optional[int] = typer.Option(
            None, "--prompts", help="Number of held-out prompts (default: the run's own, else 256)."),
        option: List[str] = typer.Option([], "-o", "--option", help="COMPONENT.KEY=VALUE, repeatable."),
        as_json: bool = typer.Option(False, "--json", help="Print {reward: score} as JSON on stdout."),
    ) -> None:
        """Score a backbone (optionally with a run's trained weights) on held-out prompts."""
        from .evaluation import evaluate
        from .runtime import build_for_eval

        comps = state.components()
        rewards = [r for part in reward for r in parse_rewards(part)]
        session = build_for_eval(comps, run_dir, backbone, rewards, sampler, prompts, option)
        with session.progress:
            res = evaluate(session.backbone, session.sampler, session.rewards, session.prompts,
                           seed or [0], 64, session.accelerator, session.progress)
        if as_json:
            print_json(res.scores)
            return
        table = Table(title=f"held-out scores ({len(session.prompts)} prompts, seeds {seed or [0]})")
        table.add_column("reward")
        table.add_column("score", justify="right")
        for k, v in res.scores.items():
            table.add_row(k, f"{v:.4f}")
        out.print(table)

    @app.command()
    def plugins(as_json: bool = typer.Option(False, "--json", help="List components as JSON on stdout.")) -> None:
        """List every component with the plugin and version that provides it."""
        comps = state.components()
        rows = [{"kind": kind, "name": e.name, "plugin": e.plugin, "version": e.version, "description": e.description}
                for kind in ("backbone", "sampler", "objective", "reward", "preset") for e in comps.by_kind(kind)]
        failures = [{"plugin": f.plugin, "error": f.error} for f in comps.failures]
        if as_json:
            print_json({"components": rows, "failures": failures})
            return
        table = Table(title="dgpo-bench components")
        for col in ("kind", "name", "plugin", "version", "description"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["kind"], r["name"], r["plugin"], r["version"], r["description"])
        out.print(table)
        for f in failures:
            err.print(f"[red]failed to load[/] {f['plugin']}: {f['error']}")

    @app.command()
    def validate(
        config: Path = typer.Argument(..., help="A run spec (TOML/JSON) or a suite file."),
        option: List[str] = typer.Option([], "-o", "--option", help="COMPONENT.KEY=VALUE, repeatable."),
    ) -> None:
        """Check a spec without building any model."""
        from .suite import is_suite, load_suite

        comps = state.components()
        if is_suite(config):
            suite = load_suite(config)
            cells = suite.cells(comps)
            out.print(f"{config}: valid suite '{suite.name}', {len(cells)} runs")
            return
        spec, notes = build_spec(comps, load_file(config), option, source=str(config))
        resolve(comps, spec, notes)
        out.print(f"{config}: valid")

    @app.command()
    def compare(
        paths: List[Path] = typer.Argument(..., help="Run directories or folders of them."),
        fmt: str = typer.Option("rich", "--format", help="rich, markdown, csv, latex or json."),
        as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
        target: Optional[float] = typer.Option(None, "--target", help="Score for time-to-target."),
        plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots into this folder."),
    ) -> None:
        """Compare finished runs in the paper's table format, with cost columns."""
        from .compare import build_table, render, write_plots
        from .results import find_runs, unfinished_runs

        runs = find_runs(paths)
        for path in unfinished_runs(paths):
            err.print(f"left out, not finished: {path}", highlight=False, soft_wrap=True)
        table = build_table(runs, target=target)
        fmt = "json" if as_json else fmt
        text = render(table, fmt)
        if fmt == "rich":
            out.print(text)
        else:
            typer.echo(text)
        if plots:
            for p in write_plots(runs, table, plots):
                err.print(f"wrote {p}")

    @app.command()
    def bench(
        suite_file: Path = typer.Argument(..., help="A suite TOML file."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Suite directory (default runs/<suite name>)."),
        only: List[str] = typer.Option([], "--only", help="Run only cells whose name (ENTRY/seedK) contains this; "
                                                          "repeatable."),
        option: List[str] = typer.Option([], "-o", "--option", help="COMPONENT.KEY=VALUE for every cell, e.g. "
                                                                    "-o sd3.path=/models/sd35m; repeatable."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Resolve every cell, list them with their status, "
                                                              "and exit."),
        jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Cells run at once, each in its own process with "
                                                                "an equal share of the CPU threads."),
    ) -> None:
        """Run every cell of a suite at equal budget; finished cells are skipped, interrupted ones resume."""
        from .errors import SuiteError
        from .suite import load_suite, run_suite

        comps = state.components()
        suite = load_suite(suite_file, option)
        report = run_suite(suite, comps, out_dir or Path("runs") / suite.name, only=only, dry_run=dry_run,
                           console=err, jobs=jobs)
        if report.failed:
            first = report.failed[0]
            raise SuiteError(f"{len(report.failed)} of {len(report.cells)} cells of suite '{suite.name}' failed "
                             f"({first.cell}: {first.error}); fix the cause and rerun the same command, which "
                             "skips the finished cells.")
