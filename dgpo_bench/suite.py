"""Suites: a matrix of runs at equal budget, from one TOML file.

A suite holds fixed what a fair comparison needs equal (backbone, training rewards,
evaluation protocol, prompts, budget) and varies the method::

    name = "ocr-nano"                  # runs go to runs/<name>/<entry>/seed<k>/
    description = "..."
    seeds = [0, 1, 2]

    [base]                             # any RunSpec settings shared by every cell
    backbone = { name = "nano" }
    rewards = [{ name = "ocr" }]
    group_size = 8
    [base.budget]                      # required; limits left out are off
    seconds = 240
    [base.eval]
    sampler = { name = "ode-euler", options = { steps = 10 } }
    prompts = 64
    every = 5

    [[entry]]                          # one row of the comparison table
    name = "dgpo"
    objective = "dgpo"                 # or { name = "dgpo", options = { ... } }
    [[entry]]
    name = "flow-grpo"
    preset = "flow-grpo-nano"          # a preset fills settings below the suite's
    sampler = "flow-sde"
    options = { flow-grpo = { clip_range = 1e-4 } }   # COMPONENT = { KEY = VALUE }

An entry may set ``objective``, ``sampler``, ``preset``, ``options`` and the method
settings ``group_size``, ``prompts_per_step``, ``rollout_batch_size``,
``checkpoint_every`` and ``log_samples``. Every cell is a full RunSpec built as
defaults < preset < [base] < entry; after resolution, the settings a suite holds fixed
must come out identical in every cell (a preset cannot sneak in a different budget or
evaluation protocol), or loading the suite fails and says which entry differs where.
A top-level ``allow_differences = ["backbone.options.lora_rank"]`` exempts named paths
under backbone, rewards or prompts (e.g. each method's published LoRA rank); budget and
evaluation protocol are always equal.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DgpoBenchError, SpecError
from .plugins import Components
from .resolve import Resolved, build_spec, resolve
from .results import RESULT_FILE, SPEC_FILE, write_atomic, write_json
from .spec import deep_merge, load_file

FIXED = ("backbone", "rewards", "eval", "budget", "prompts")
"""Resolved settings every cell of a suite must share."""
MAY_DIFFER = ("backbone", "rewards", "prompts")
"""Fixed settings a suite may exempt, path by path, with ``allow_differences``."""
ENTRY_KEYS = {"name", "description", "objective", "sampler", "preset", "options", "group_size",
              "prompts_per_step", "rollout_batch_size", "checkpoint_every", "log_samples"}
SUITE_KEYS = {"name", "description", "seeds", "base", "entry", "allow_differences"}
BUDGET_KEYS = ("steps", "seconds", "images", "reward_calls")
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Entry:
    name: str
    settings: dict[str, Any]
    overrides: list[str]


@dataclass
class Cell:
    """One run of a suite: an entry at one seed, resolved without building a model."""

    entry: str
    seed: int
    resolved: Resolved

    @property
    def name(self) -> str:
        return f"{self.entry}/seed{self.seed}"

    def run_dir(self, out_dir: Path) -> Path:
        return Path(out_dir) / self.entry / f"seed{self.seed}"


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    seeds: list[int]
    base: dict[str, Any]
    entries: list[Entry]
    allow_differences: list[str] = field(default_factory=list)
    """Dotted paths of fixed settings that cells may resolve differently (e.g. a preset's LoRA rank)."""
    overrides: list[str] = field(default_factory=list)
    """``-o COMPONENT.KEY=VALUE`` applied to every cell (e.g. a local weights path)."""

    def cells(self, comps: Components) -> list[Cell]:
        """Every (entry, seed) cell, built and resolved; checks that the fixed part is equal."""
        cells = []
        for entry in self.entries:
            user = deep_merge(self.base, entry.settings)
            source = f"{self.path} entry '{entry.name}'"
            for seed in self.seeds:
                try:
                    spec, notes = build_spec(comps, {**user, "name": entry.name, "seed": seed},
                                             [*entry.overrides, *self.overrides], source=source)
                    resolved = resolve(comps, spec, notes)
                except DgpoBenchError as exc:
                    raise SpecError(f"{source}: {exc}") from exc
                cells.append(Cell(entry.name, seed, resolved))
        _check_equal(cells, self.path, self.allow_differences)
        return cells


def _differences(a: Any, b: Any, where: str) -> list[tuple[str, Any, Any]]:
    """Dotted paths at which two resolved settings differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in list(a) + [k for k in b if k not in a]
                for d in _differences(a.get(key), b.get(key), f"{where}.{key}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [(where, a, b)]


def _check_equal(cells: list[Cell], path: Path, allowed: list[str]) -> None:
    first = cells[0]
    ref = first.resolved.resolved_dict()
    for cell in cells[1:]:
        mine = cell.resolved.resolved_dict()
        for key in FIXED:
            diffs = [d for d in _differences(ref.get(key), mine.get(key), key)
                     if not any(d[0] == a or d[0].startswith((a + ".", a + "[")) for a in allowed)]
            if diffs:
                where, a, b = diffs[0]
                raise SpecError(
                    f"Suite {path}: entries '{first.entry}' and '{cell.entry}' resolve to different {where} "
                    f"({json.dumps(a)} vs {json.dumps(b)}), which every cell must share; set it in [base] "
                    "(a preset or an entry's options changed it), or list it in allow_differences.")


def is_suite(path: Path) -> bool:
    """Whether ``path`` is a TOML file with ``[[entry]]`` tables."""
    path = Path(path)
    if path.suffix != ".toml" or not path.is_file():
        return False
    try:
        return "entry" in tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        return False


def _component(value: Any, key: str, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value
    raise SpecError(f"{where}: '{key}' must be a name or a table with a name, e.g. {key} = \"dgpo\".")


def _entry(raw: Any, i: int, path: Path) -> Entry:
    if not isinstance(raw, dict):
        raise SpecError(f"Suite {path}: entry {i + 1} is not a table; write it as [[entry]] with name = ...")
    name = raw.get("name")
    where = f"Suite {path}, entry '{name or i + 1}'"
    if not isinstance(name, str) or not _SAFE.fullmatch(name):
        raise SpecError(f"{where}: every entry needs a name of letters, digits, '.', '_' or '-' "
                        "(it names the run directory).")
    fixed = sorted(set(raw) & set(FIXED) | set(raw) & {"seed", "seeds"})
    if fixed:
        raise SpecError(f"{where} sets {', '.join(fixed)}, which a suite holds equal for every cell; "
                        "set it in [base] (or seeds at the top level).")
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown setting '{unknown[0]}'; an entry may set "
                        f"{', '.join(sorted(ENTRY_KEYS))}.")
    if "objective" not in raw and "preset" not in raw:
        raise SpecError(f"{where} names neither an objective nor a preset; add objective = \"...\".")
    settings = {k: v for k, v in raw.items() if k not in ("name", "description", "options")}
    for role in ("objective", "sampler"):
        if role in settings:
            settings[role] = _component(settings[role], role, where)
    options = raw.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise SpecError(f"{where}: options must map components to tables, e.g. options = {{ dgpo = {{ beta = 1 }} }}.")
    overrides = [f"{comp}.{key}={json.dumps(value)}" for comp, opts in options.items() for key, value in opts.items()]
    return Entry(name, settings, overrides)


def load_suite(path: Path, overrides: list[str] = ()) -> Suite:
    """Parse and check a suite file's shape (components are checked by ``Suite.cells``)."""
    path = Path(path)
    data = load_file(path)
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise SpecError(f"Suite {path}: unknown top-level setting '{unknown[0]}'; a suite has "
                        f"{', '.join(sorted(SUITE_KEYS))} (run settings go in [base]).")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _SAFE.fullmatch(name):
        raise SpecError(f"Suite {path}: name '{name}' must be letters, digits, '.', '_' or '-' (it names runs/<name>).")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SpecError(f"Suite {path}: seeds must be a list of distinct integers, e.g. seeds = [0, 1, 2].")
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise SpecError(f"Suite {path}: base must be a table ([base]).")
    taken = sorted(set(base) & {"name", "seed", "preset"})
    if taken:
        raise SpecError(f"Suite {path}: [base] sets '{taken[0]}', which belongs to the entries "
                        "(seeds at the top level, name and preset per entry).")
    budget = base.get("budget")
    if not isinstance(budget, dict) or not any(budget.get(k) is not None for k in BUDGET_KEYS):
        raise SpecError(f"Suite {path} has no budget; add [base.budget] with steps, seconds, images or "
                        "reward_calls, the limit every cell gets alike.")
    # the suite's budget is exactly what it says: limits it leaves out are off, not defaults
    base = {**base, "budget": {**{k: None for k in BUDGET_KEYS}, **budget}}
    raw_entries = data.get("entry")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise SpecError(f"Suite {path} has no entries; add [[entry]] tables with name and objective.")
    entries = [_entry(raw, i, path) for i, raw in enumerate(raw_entries)]
    dupes = sorted({e.name for e in entries if [x.name for x in entries].count(e.name) > 1})
    if dupes:
        raise SpecError(f"Suite {path}: entry name '{dupes[0]}' is used twice; give each entry its own name.")
    allowed = data.get("allow_differences", [])
    if not isinstance(allowed, list) or not all(isinstance(a, str) and re.split(r"[.\[]", a)[0] in MAY_DIFFER
                                                for a in allowed):
        raise SpecError(f"Suite {path}: allow_differences must list dotted paths under {', '.join(MAY_DIFFER)} "
                        "(budget and eval are always equal), e.g. [\"backbone.options.lora_rank\"].")
    return Suite(name, path, data.get("description", ""), seeds, base, entries, allowed, list(overrides))


# --------------------------------------------------------------------------- running


@dataclass
class CellReport:
    cell: str
    run_dir: Path
    status: str
    """'finished' (already done, skipped), 'ran', 'resumed' or 'failed'."""
    seconds: float = 0.0
    error: str | None = None


@dataclass
class SuiteReport:
    suite: str
    out_dir: Path
    cells: list[CellReport]

    @property
    def failed(self) -> list[CellReport]:
        return [c for c in self.cells if c.status == "failed"]


def _status(run_dir: Path) -> str:
    from .engine import CHECKPOINT_DIR

    if (run_dir / RESULT_FILE).is_file():
        return "finished"
    if (run_dir / CHECKPOINT_DIR / "engine.json").is_file():
        return "will resume"
    return "to run"


def _same_spec(cell: Cell, run_dir: Path) -> bool:
    path = run_dir / SPEC_FILE
    if not path.is_file():
        return True
    return json.loads(path.read_text()) == json.loads(json.dumps(cell.resolved.resolved_dict()))


def _print_cells(console, title: str, rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for h in headers:  # cell names and statuses stay on one line; the rest may fold
        table.add_column(h, overflow="fold", no_wrap=h in ("cell", "status"))
    for r in rows:
        table.add_row(*r)
    console.print(table)


def _budget_text(budget: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in budget.items() if v is not None)


def run_suite(suite: Suite, comps: Components, out_dir: Path, *, only: list[str] = (), dry_run: bool = False,
              console=None, jobs: int = 1) -> SuiteReport:
    """Run every cell, ``jobs`` at a time; finished cells are skipped, checkpointed ones resume,
    and a failing cell is reported while the others go on."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    cells = suite.cells(comps)
    if only:
        cells = [c for c in cells if any(o in c.name for o in only)]
        if not cells:
            raise SpecError(f"No cell of suite '{suite.name}' matches --only {' '.join(only)}; cells are named "
                            f"like '{suite.entries[0].name}/seed{suite.seeds[0]}'.")
    budget = _budget_text(cells[0].resolved.spec.budget.model_dump())
    if dry_run:
        rows = [(c.name, c.resolved.spec.objective.name, c.resolved.spec.sampler.name, c.resolved.spec.preset or "",
                 str(c.resolved.spec.images_per_step), _status(c.run_dir(out_dir))) for c in cells]
        _print_cells(console, f"suite '{suite.name}' in {out_dir}: {len(cells)} cells, budget {budget} each", rows,
                     ("cell", "objective", "sampler", "preset", "images/step", "status"))
        return SuiteReport(suite.name, out_dir, [CellReport(c.name, c.run_dir(out_dir), _status(c.run_dir(out_dir)))
                                                 for c in cells])

    from accelerate import PartialState

    main = PartialState().is_main_process
    if not main:  # every process runs every cell; one of them reports
        console = Console(quiet=True)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "suite.toml", suite.path.read_bytes())
    if jobs > 1 and PartialState().num_processes == 1:
        reports = _run_parallel(suite, cells, out_dir, jobs, budget, console)
    else:
        reports = []
        for i, cell in enumerate(cells, 1):
            reports.append(_run_cell(cell, out_dir, comps, f"[{i}/{len(cells)}] {cell.name}", budget, console, main))
            if main:
                _write_status(out_dir, suite, reports)
    report = SuiteReport(suite.name, out_dir, reports)
    rows = [(r.cell, r.status, f"{r.seconds:.0f} s" if r.seconds else "", r.error or "") for r in reports]
    _print_cells(console, f"suite '{suite.name}' in {out_dir}", rows, ("cell", "status", "time", "error"))
    if not report.failed:
        console.print(f"compare with: dgpo-bench compare {out_dir}")
    return report


def _run_parallel(suite: Suite, cells: list[Cell], out_dir: Path, jobs: int, budget: str,
                  console) -> list[CellReport]:
    """Cells in ``jobs`` worker processes, the CPU threads split between them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    console.print(f"running {len(cells)} cells, {jobs} at a time with {threads} CPU thread(s) each")
    done: dict[str, CellReport] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_cell_worker, str(suite.path), suite.overrides, c.name, str(out_dir),
                               f"[{i}/{len(cells)}] {c.name}", budget) for i, c in enumerate(cells, 1)]
        for fut in as_completed(futures):
            report = fut.result()
            done[report.cell] = report
            _write_status(out_dir, suite, [done[c.name] for c in cells if c.name in done])
    return [done[c.name] for c in cells]


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _cell_worker(suite_path: str, overrides: list[str], name: str, out_dir: str, head: str,
                 budget: str) -> CellReport:
    from rich.console import Console

    from .plugins import get_plugin_manager, load_components, plugins_dirs_from_env

    comps = load_components(get_plugin_manager(plugins_dirs=plugins_dirs_from_env()))
    cell = next(c for c in load_suite(Path(suite_path), overrides).cells(comps) if c.name == name)
    return _run_cell(cell, Path(out_dir), comps, head, budget, Console(stderr=True), True, progress=False)


def _run_cell(cell: Cell, out_dir: Path, comps: Components, head: str, budget: str, console,
              main: bool, progress: bool = True) -> CellReport:
    """Skip a finished cell (if its spec still matches), else run or resume it; never raise
    for a cell's own failure."""
    from .engine import Engine

    run_dir = cell.run_dir(out_dir)
    status = _status(run_dir)
    if status == "finished":
        if _same_spec(cell, run_dir):
            console.print(f"{head}: finished earlier, skipped")
            return CellReport(cell.name, run_dir, "finished")
        msg = (f"{run_dir} finished with a different spec than the suite now gives; restore the suite or "
               "delete that directory to rerun the cell")
        console.print(f"[red]{head}: {msg}[/]")
        return CellReport(cell.name, run_dir, "failed", error=msg)
    spec = cell.resolved.spec
    console.print(f"[bold]{head}[/]: {spec.objective.name} with {spec.sampler.name}, {budget}"
                  f"{' (resuming)' if status == 'will resume' else ''}")
    t0 = time.perf_counter()
    try:
        Engine(cell.resolved, run_dir, progress=progress, plugin_versions=comps.versions).run()
        console.print(f"{head}: finished in {time.perf_counter() - t0:.0f} s")
        if main:
            (run_dir / "error.log").unlink(missing_ok=True)
        return CellReport(cell.name, run_dir, "resumed" if status == "will resume" else "ran",
                          time.perf_counter() - t0)
    except Exception as exc:  # KeyboardInterrupt is not an Exception: it stops the suite
        msg = str(exc) if isinstance(exc, DgpoBenchError) else f"{type(exc).__name__}: {exc}"
        console.print(f"[red]{head} failed:[/] {msg}", highlight=False)
        if main:
            write_atomic(run_dir / "error.log", traceback.format_exc().encode())
        return CellReport(cell.name, run_dir, "failed", time.perf_counter() - t0, msg)
    finally:
        _release_memory()


def _write_status(out_dir: Path, suite: Suite, reports: list[CellReport]) -> None:
    write_json(out_dir / "suite.json", {"name": suite.name, "source": str(suite.path),
                                        "cells": [{"cell": r.cell, "run_dir": str(r.run_dir), "status": r.status,
                                                   "seconds": round(r.seconds, 1), "error": r.error}
                                                  for r in reports]})


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
