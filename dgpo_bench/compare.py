"""Comparison tables and plots: pure functions over finished run directories.

Nothing is recomputed: every number comes from ``result.json`` and ``metrics.jsonl``.
The table has the shape of the DGPO paper's results table: runs are grouped into
sections by (backbone, training rewards); each section has a row for the base model and
one per method (runs whose specs differ only in their seed), with mean +- sample std
over seeds. Score columns are the training rewards (in-domain) followed by the other
evaluation rewards (out-of-domain); the best method per column and section is marked
using each reward's direction. Cost columns hold training wall-clock, images, model
evaluations (NFEs) and time-to-target with the speed-up over the slowest method.

Time-to-target is read off each method's mean curve (held-out training-reward score
averaged over seeds at every evaluation, against mean training cost, evaluation time
excluded): the first evaluation at which it reaches the target. The default target is
the final score of the method that ends worst, a score every method reaches, so the
speed-up column says how many times faster each method gets there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError
from .results import RunRecord, write_atomic

FORMATS = ("rich", "markdown", "csv", "latex", "json")
COST_KEYS = ("train_seconds", "images", "nfe_total")
DASH = "–"


@dataclass
class Stat:
    """Mean and sample standard deviation (None for a single value) of per-seed values."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(statistics.mean(self.values))

    @property
    def std(self) -> float | None:
        return float(statistics.stdev(self.values)) if len(self.values) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


@dataclass
class Column:
    name: str
    higher_is_better: bool
    in_domain: bool


@dataclass
class Point:
    """One evaluation on a method's mean curve: score and cost averaged over seeds."""

    step: float
    score: Stat
    cost: dict[str, float]
    final: bool


@dataclass
class TimeToTarget:
    step: float
    cost: dict[str, float]
    """Mean training cost (train_seconds, images, nfe_total) at the first evaluation reaching the target."""
    speedup: dict[str, float | None] = field(default_factory=dict)
    """Cost of the slowest method to the target divided by this method's, per cost key."""


@dataclass
class Row:
    label: str
    runs: list[Path]
    seeds: list[int]
    scores: dict[str, Stat]
    best: set[str] = field(default_factory=set)
    cost: dict[str, Stat] = field(default_factory=dict)
    curve: list[Point] = field(default_factory=list)
    to_target: TimeToTarget | None = None


@dataclass
class Section:
    title: str
    backbone: str
    train_rewards: list[str]
    target_reward: str
    higher_is_better: bool
    base: Row
    rows: list[Row]
    target: float | None = None
    target_source: str = ""
    reference: str | None = None
    """Label of the slowest method that reaches the target (the speed-up reference)."""
    notes: list[str] = field(default_factory=list)


@dataclass
class ComparisonTable:
    columns: list[Column]
    sections: list[Section]

    def to_dict(self) -> dict[str, Any]:
        def row(r: Row) -> dict[str, Any]:
            ttt = None
            if r.to_target is not None:
                ttt = {"step": r.to_target.step, **r.to_target.cost, "speedup": r.to_target.speedup}
            return {"label": r.label, "runs": [str(p) for p in r.runs], "seeds": r.seeds,
                    "scores": {k: v.to_dict() for k, v in r.scores.items()}, "best": sorted(r.best),
                    "cost": {k: v.to_dict() for k, v in r.cost.items()}, "time_to_target": ttt,
                    "curve": [{"step": p.step, "final": p.final, "score": p.score.to_dict(), **p.cost}
                              for p in r.curve]}

        return {
            "columns": [vars(c) for c in self.columns],
            "sections": [{"title": s.title, "backbone": s.backbone, "train_rewards": s.train_rewards,
                          "target": {"reward": s.target_reward, "value": s.target, "source": s.target_source,
                                     "higher_is_better": s.higher_is_better, "reference": s.reference},
                          "notes": s.notes, "base": row(s.base), "rows": [row(r) for r in s.rows]}
                         for s in self.sections],
        }


# --------------------------------------------------------------------------- building


def _train_rewards(run: RunRecord) -> list[str]:
    return [r["name"] for r in run.spec.get("rewards", [])] or [run.result["train_reward"]]


def _method_key(run: RunRecord) -> str:
    spec = {k: v for k, v in run.spec.items() if k != "seed"}
    return json.dumps(spec, sort_keys=True)


def _reached(score: float, target: float, higher: bool) -> bool:
    return score >= target if higher else score <= target


def _curve(runs: list[RunRecord], reward: str) -> list[Point]:
    """Mean curve over seeds: evaluations at steps every seed has, then the final ones."""
    per_run: list[tuple[dict[int, tuple[float, dict[str, float]]], tuple[float, float, dict[str, float]]]] = []
    for run in runs:
        periodic: dict[int, tuple[float, dict[str, float]]] = {}
        final = None
        if reward in run.result.get("base", {}):
            periodic[0] = (run.result["base"][reward], {k: 0.0 for k in COST_KEYS})
        for rec in run.evals:  # a later record for the same step (after a resume) replaces the earlier one
            if reward not in rec.get("scores", {}):
                continue
            cost = {k: float(rec.get("cost", {}).get(k, 0.0)) for k in COST_KEYS}
            if rec.get("label") == "final":
                final = (float(rec["step"]), rec["scores"][reward], cost)
            else:
                periodic[int(rec["step"])] = (rec["scores"][reward], cost)
        if final is None:
            final = (float(run.result.get("steps", 0)), run.result["tuned"][reward],
                     {k: float(run.result.get("cost", {}).get(k, 0.0)) for k in COST_KEYS})
        per_run.append((periodic, final))
    common = set.intersection(*(set(p) for p, _ in per_run))
    points = []
    for step in sorted(common):
        entries = [p[step] for p, _ in per_run]
        points.append(Point(float(step), Stat([e[0] for e in entries]),
                            {k: math.fsum(e[1][k] for e in entries) / len(entries) for k in COST_KEYS}, False))
    finals = [f for _, f in per_run]
    points.append(Point(math.fsum(f[0] for f in finals) / len(finals), Stat([f[1] for f in finals]),
                        {k: math.fsum(f[2][k] for f in finals) / len(finals) for k in COST_KEYS}, True))
    return points


def _fmt_target(section: Section) -> str:
    return f"{section.target:.4g}"


def build_table(runs: list[RunRecord], target: float | None = None) -> ComparisonTable:
    """Group ``runs`` into sections and methods and compute every number the table shows."""
    if not runs:
        raise SpecError("No runs to compare; pass run directories or a suite directory.")
    unique: dict[Path, RunRecord] = {}
    for run in runs:  # a directory reached twice (overlapping arguments, links) counts once
        unique.setdefault(Path(run.path).resolve(), run)
    runs = list(unique.values())
    sections: dict[tuple[str, tuple[str, ...]], dict[str, list[RunRecord]]] = {}
    higher: dict[str, bool] = {}
    order: list[str] = []
    for run in runs:
        for name, hib in run.result.get("higher_is_better", {}).items():
            if name in higher and higher[name] != hib:
                raise SpecError(f"Runs disagree on whether a higher '{name}' is better ({run.path}); compare runs "
                                "of one reward version at a time.")
            higher.setdefault(name, hib)
        for name in list(run.result.get("tuned", {})) + list(run.result.get("base", {})):
            if name not in order:
                order.append(name)
        key = (run.spec.get("backbone", {}).get("name", "?"), tuple(_train_rewards(run)))
        sections.setdefault(key, {}).setdefault(_method_key(run), []).append(run)
    in_domain = [r for key in sections for r in key[1] if r in order]
    in_domain = list(dict.fromkeys(in_domain))
    columns = [Column(n, higher.get(n, True), True) for n in in_domain]
    columns += [Column(n, higher.get(n, True), False) for n in order if n not in in_domain]

    out = []
    for (backbone, train), methods in sections.items():
        all_runs = [r for group in methods.values() for r in group]
        base_scores = {c.name: Stat([r.result["base"][c.name] for r in all_runs
                                     if c.name in r.result.get("base", {})]) for c in columns}
        base = Row(f"{backbone} (base)", [r.path for r in all_runs],
                   sorted({r.result.get("seed", 0) for r in all_runs}), {k: v for k, v in base_scores.items() if v.n})
        rows = []
        for group in methods.values():
            group = sorted(group, key=lambda r: (r.result.get("seed", 0), str(r.path)))
            for a, b in zip(group, group[1:]):
                if a.result.get("seed", 0) == b.result.get("seed", 0):
                    raise SpecError(f"{a.path} and {b.path} are runs of the same method with the same seed; "
                                    "pass only one of them so that statistics are over distinct seeds.")
            spec = group[0].spec
            label = spec.get("name") or spec.get("objective", {}).get("name", "?")
            scores = {c.name: Stat([r.result["tuned"][c.name] for r in group if c.name in r.result.get("tuned", {})])
                      for c in columns}
            cost = {k: Stat([float(r.result.get("cost", {}).get(k, 0.0)) for r in group]) for k in COST_KEYS}
            curve = _curve(group, train[0]) if all(train[0] in r.result.get("tuned", {}) for r in group) else []
            rows.append(Row(label, [r.path for r in group], [r.result.get("seed", 0) for r in group],
                            {k: v for k, v in scores.items() if v.n}, cost=cost, curve=curve))
        _unique_labels(rows, methods)
        if len({len(r.runs) for r in rows}) > 1:  # a method short of seeds (a failed cell) says so
            for r in rows:
                r.label += f" (n={len(r.runs)})"
        section = Section(f"{'+'.join(train)} on {backbone}", backbone, list(train), train[0],
                          higher.get(train[0], True), base, rows)
        _mark_best(section, columns)
        _time_to_target(section, target)
        section.notes += _fairness_notes(all_runs)
        out.append(section)
    return ComparisonTable(columns, out)


def _unique_labels(rows: list[Row], methods: dict[str, list[RunRecord]]) -> None:
    """Methods that share a label (e.g. two ad-hoc runs of one objective) get their sampler, then an index."""
    groups = list(methods.values())
    for label in {r.label for r in rows}:
        same = [i for i, r in enumerate(rows) if r.label == label]
        if len(same) < 2:
            continue
        for i in same:
            sampler = (groups[i][0].spec.get("sampler") or {}).get("name")
            rows[i].label = f"{label} [{sampler}]" if sampler else label
        if len({rows[i].label for i in same}) < len(same):
            for k, i in enumerate(same, 1):
                rows[i].label = f"{rows[i].label} #{k}"


def _mark_best(section: Section, columns: list[Column]) -> None:
    for col in columns:
        means = [(r, r.scores[col.name].mean) for r in section.rows if col.name in r.scores]
        if not means:
            continue
        best = (max if col.higher_is_better else min)(m for _, m in means)
        for r, m in means:
            if m == best:
                r.best.add(col.name)


def _time_to_target(section: Section, target: float | None) -> None:
    rows = [r for r in section.rows if r.curve]
    if not rows:
        return
    hib = section.higher_is_better
    if target is None:
        worst = (min if hib else max)(rows, key=lambda r: r.curve[-1].score.mean)
        section.target = worst.curve[-1].score.mean
        section.target_source = f"final score of {worst.label}, the method that ends worst"
    else:
        section.target, section.target_source = target, "given"
    base = section.base.scores.get(section.target_reward)
    if base is not None and _reached(base.mean, section.target, hib):
        section.notes.append(f"the base model already reaches the target ({section.target_reward} "
                             f"{base.mean:.4g}), so no method improved on it")
    for r in rows:
        hit = next((p for p in r.curve if _reached(p.score.mean, section.target, hib)), None)
        if hit is not None:
            r.to_target = TimeToTarget(hit.step, dict(hit.cost))
    reached = [r for r in rows if r.to_target is not None]
    if not reached:
        return
    ref = max(reached, key=lambda r: (r.to_target.cost["train_seconds"], r.to_target.cost["images"]))
    section.reference = ref.label
    for r in reached:
        r.to_target.speedup = {k: (ref.to_target.cost[k] / r.to_target.cost[k] if r.to_target.cost[k] > 0 else None)
                               for k in COST_KEYS}


def _fairness_notes(runs: list[RunRecord]) -> list[str]:
    notes = []
    for part, what in (("budget", "budgets"), ("eval", "evaluation protocols")):
        if len({json.dumps(r.spec.get(part), sort_keys=True) for r in runs}) > 1:
            notes.append(f"the runs in this section have different {what}; the comparison is not at equal "
                         f"{'budget' if part == 'budget' else 'protocol'}")
    return notes


# --------------------------------------------------------------------------- formatting


def _decimals(values: list[float]) -> int:
    big = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    if big == 0:
        return 3
    return min(3, max(1, 3 - int(math.floor(math.log10(big)))))


def _column_decimals(table: ComparisonTable) -> dict[str, int]:
    out = {}
    for c in table.columns:
        vals = [r.scores[c.name].mean for s in table.sections for r in [s.base, *s.rows] if c.name in r.scores]
        out[c.name] = _decimals(vals)
    return out


def _score_text(stat: Stat | None, decimals: int, is_base: bool) -> tuple[str, str]:
    """Mean and '± std' texts; the base row shows no std when all its runs scored it alike."""
    if stat is None:
        return DASH, ""
    std = stat.std
    if std is None or (is_base and std == 0):
        return f"{stat.mean:.{decimals}f}", ""
    return f"{stat.mean:.{decimals}f}", f" ± {std:.{decimals}f}"


def _seconds(s: float) -> str:
    if s < 100:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div * 10:
            return f"{n / div:.1f}{unit}"
    return f"{n:,.0f}"


def _speedup(r: Row) -> str:
    if r.to_target is None:
        return DASH
    s = r.to_target.speedup.get("train_seconds")
    return DASH if s is None else f"{s:.1f}×"


COST_HEADERS = ("train time", "images", "NFEs", "time to target", "speed-up")


def _cost_cells(r: Row, section: Section, is_base: bool) -> list[str]:
    if is_base:
        return [DASH] * len(COST_HEADERS)
    cells = [_seconds(r.cost["train_seconds"].mean), _count(r.cost["images"].mean), _count(r.cost["nfe_total"].mean)]
    if section.target is None or not r.curve:
        return cells + [DASH, DASH]
    if r.to_target is None:
        return cells + ["not reached", DASH]
    return cells + [_seconds(r.to_target.cost["train_seconds"]), _speedup(r)]


def _header(c: Column) -> str:
    return f"{c.name} {'↑' if c.higher_is_better else '↓'}"


def _caption(table: ComparisonTable) -> list[str]:
    lines = []
    ind = [c.name for c in table.columns if c.in_domain]
    ood = [c.name for c in table.columns if not c.in_domain]
    lines.append(f"Held-out scores, mean ± std over seeds. In-domain: {', '.join(ind) or DASH}; "
                 f"out-of-domain: {', '.join(ood) or DASH}. Best per column in each section is marked.")
    for s in table.sections:
        seeds = sorted({len(r.runs) for r in s.rows})
        if s.target is not None:
            ref = f"; speed-up relative to {s.reference}" if s.reference else ""
            lines.append(f"{s.title}: {len(s.rows)} method{'s' if len(s.rows) > 1 else ''}, "
                         f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}; time to target = "
                         f"training time to reach {s.target_reward} {'≥' if s.higher_is_better else '≤'} "
                         f"{_fmt_target(s)} ({s.target_source}){ref}.")
        lines += [f"{s.title}: note: {n}." for n in s.notes]
    return lines


def _rows(table: ComparisonTable):
    """(section, row, is_base) in display order, with a section title row when there are several."""
    for s in table.sections:
        yield s, None, False
        yield s, s.base, True
        for r in s.rows:
            yield s, r, False


def render(table: ComparisonTable, fmt: str):
    """The table as a rich renderable (``rich``) or text (markdown, csv, latex, json)."""
    renderers = {"rich": _rich, "markdown": _markdown, "csv": _csv, "latex": _latex, "json": _json}
    if fmt not in renderers:
        raise SpecError(f"Unknown format '{fmt}'; use one of {', '.join(FORMATS)}.")
    return renderers[fmt](table)


def _json(table: ComparisonTable) -> str:
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(table.to_dict()), indent=2)


def _markdown(table: ComparisonTable) -> str:
    dec = _column_decimals(table)
    headers = ["Model", *(_header(c) for c in table.columns), *COST_HEADERS]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    several = len(table.sections) > 1
    for s, r, is_base in _rows(table):
        if r is None:
            if several:
                lines.append(f"| *{s.title}* |" + " |" * (len(headers) - 1))
            continue
        cells = [r.label]
        for c in table.columns:
            mean, std = _score_text(r.scores.get(c.name), dec[c.name], is_base)
            cells.append(f"**{mean}{std}**" if c.name in r.best else f"{mean}{std}")
        cells += _cost_cells(r, s, is_base)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + _caption(table)) + "\n"


def _csv(table: ComparisonTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["section", "model", "kind", "seeds"]
    for c in table.columns:
        header += [f"{c.name}_mean", f"{c.name}_std", f"{c.name}_best"]
    header += ["train_seconds", "images", "nfe_total", "target", "to_target_seconds", "to_target_images",
               "to_target_nfe", "speedup"]
    w.writerow(header)

    def num(x: float | None) -> str:
        return "" if x is None else repr(float(x))

    for s, r, is_base in _rows(table):
        if r is None:
            continue
        row = [s.title, r.label, "base" if is_base else "method", len(r.runs) if not is_base else ""]
        for c in table.columns:
            st = r.scores.get(c.name)
            row += [num(st.mean if st else None), num(st.std if st else None),
                    "" if is_base else int(c.name in r.best)]
        if is_base:
            row += [""] * 8
        else:
            t = r.to_target
            row += [num(r.cost[k].mean) for k in COST_KEYS]
            row += [num(s.target)]
            row += [num(t.cost[k]) if t else "" for k in COST_KEYS]
            row += [num(t.speedup.get("train_seconds")) if t else ""]
        w.writerow(row)
    return buf.getvalue()


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "×": r"$\times$", "–": "--", "≥": r"$\geq$", "≤": r"$\leq$"}


def _tex(text: str) -> str:
    return re.sub("|".join(re.escape(k) for k in _LATEX_ESCAPES), lambda m: _LATEX_ESCAPES[m.group(0)], text)


def _latex(table: ComparisonTable) -> str:
    dec = _column_decimals(table)
    ind = [c for c in table.columns if c.in_domain]
    ood = [c for c in table.columns if not c.in_domain]
    ncol = 1 + len(table.columns) + len(COST_HEADERS)
    lines = [r"\begin{tabular}{l" + "c" * len(ind) + ("|" + "c" * len(ood) if ood else "") + "|" +
             "r" * len(COST_HEADERS) + "}", r"\toprule"]
    groups, rules, col = [""], [], 2
    for title, cols in (("In-domain", ind), ("Out-of-domain", ood), ("Cost", COST_HEADERS)):
        if cols:
            groups.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{title}}}")
            rules.append(rf"\cmidrule(lr){{{col}-{col + len(cols) - 1}}}")
            col += len(cols)
    lines.append(" & ".join(groups) + r" \\")
    lines.append(" ".join(rules))
    heads = ["Model"] + [_tex(c.name) + (r" $\uparrow$" if c.higher_is_better else r" $\downarrow$")
                         for c in (*ind, *ood)] + [_tex(h) for h in COST_HEADERS]
    lines.append(" & ".join(heads) + r" \\")
    lines.append(r"\midrule")
    several = len(table.sections) > 1
    for s, r, is_base in _rows(table):
        if r is None:
            if several:
                if s is not table.sections[0]:
                    lines.append(r"\midrule")
                lines.append(rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{_tex(s.title)}}}}} \\")
            continue
        cells = [_tex(r.label)]
        for c in (*ind, *ood):
            mean, std = _score_text(r.scores.get(c.name), dec[c.name], is_base)
            mean = rf"\textbf{{{mean}}}" if c.name in r.best else _tex(mean)
            cells.append(mean + _tex(std))
        cells += [_tex(x) for x in _cost_cells(r, s, is_base)]
        lines.append(" & ".join(cells) + r" \\")
        if is_base and not several:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += ["% " + line for line in _caption(table)]
    return "\n".join(lines) + "\n"


def _rich(table: ComparisonTable):
    from rich.markup import escape
    from rich.table import Table

    dec = _column_decimals(table)
    t = Table(title="held-out scores (mean ± std over seeds) and training cost",
              caption=escape("\n".join(_caption(table))), caption_justify="left")
    t.add_column("Model")
    for c in table.columns:
        t.add_column(_header(c) + ("" if c.in_domain else " (ood)"), justify="right")
    for h in COST_HEADERS:
        t.add_column(h, justify="right", style="dim" if h in ("images", "NFEs") else None)
    several = len(table.sections) > 1
    for s, r, is_base in _rows(table):
        if r is None:
            if several:
                t.add_row(f"[italic]{escape(s.title)}[/]")
            continue
        cells = [escape(r.label)]
        for c in table.columns:
            mean, std = _score_text(r.scores.get(c.name), dec[c.name], is_base)
            cells.append(f"[bold green]{mean}{std}[/]" if c.name in r.best else f"{mean}{std}")
        t.add_row(*cells, *_cost_cells(r, s, is_base), end_section=is_base or r is s.rows[-1])
    return t


# --------------------------------------------------------------------------- plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "section"


def write_plots(runs: list[RunRecord], table: ComparisonTable, folder: Path) -> list[Path]:
    """Per section: held-out score vs training wall-clock and vs images (mean line and
    +- std band over seeds per method), and a sample grid of base and each method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    written = []
    for s in table.sections:
        slug = _slug(s.title) if len(table.sections) > 1 else "comparison"
        for key, xlabel, name in (("train_seconds", "training wall-clock (s)", "score_vs_seconds"),
                                  ("images", "training images generated", "score_vs_images")):
            fig = Figure(figsize=(6.4, 4.2), dpi=120)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            for r in s.rows:
                if not r.curve:
                    continue
                xs = [p.cost[key] for p in r.curve]
                ys = [p.score.mean for p in r.curve]
                sd = [p.score.std or 0.0 for p in r.curve]
                line, = ax.plot(xs, ys, marker="o", markersize=3, label=f"{r.label} (n={len(r.runs)})")
                ax.fill_between(xs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
            if s.target is not None:
                ax.axhline(s.target, color="grey", linestyle="--", linewidth=1, label=f"target {_fmt_target(s)}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"held-out {s.target_reward} ({'higher' if s.higher_is_better else 'lower'} is better)")
            ax.set_title(s.title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            path = folder / f"{slug}_{name}.png"
            write_atomic(path, buf.getvalue())
            written.append(path)
        grid = _sample_grid(s)
        if grid is not None:
            path = folder / f"{slug}_samples.png"
            write_atomic(path, grid)
            written.append(path)
    return written


def _sample_grid(section: Section) -> bytes | None:
    """Base and each method's final sample grid side by side (same prompts and eval noise)."""
    from PIL import Image, ImageDraw

    panels: list[tuple[str, Path]] = []
    base = next((p / "samples" / "base.png" for p in section.base.runs if (p / "samples" / "base.png").is_file()), None)
    if base is not None:
        panels.append((section.base.label, base))
    for r in section.rows:
        final = next((p / "samples" / "final.png" for p in r.runs if (p / "samples" / "final.png").is_file()), None)
        if final is not None:
            seed = r.seeds[r.runs.index(final.parent.parent)]
            panels.append((f"{r.label} (seed {seed})", final))
    if len(panels) < 2:
        return None
    images = [Image.open(p).convert("RGB") for _, p in panels]
    scale = max(1, 384 // max(im.width for im in images))
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    label_h, pad = 16, 8
    width = sum(im.width for im in images) + pad * (len(images) + 1)
    height = max(im.height for im in images) + label_h + 2 * pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for (label, _), im in zip(panels, images):
        draw.text((x, pad // 2), label, fill="black")
        canvas.paste(im, (x, pad + label_h))
        x += im.width + pad
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
