"""compare over run directories written here with known numbers, checked against plain
reference computations (means, sample stds, best, time-to-target, speed-up)."""

import csv
import io
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from dgpo_bench.compare import build_table, render, write_plots
from dgpo_bench.errors import SpecError
from dgpo_bench.results import find_runs

HIGHER = {"ocr": True, "aesthetic": True, "blur": False}
BASE = {"ocr": 0.5, "aesthetic": 5.0, "blur": 0.35}

# per method and seed: ocr at steps 0 (base), 10, 20 and final (step 30), with train seconds at each
CURVES = {
    "dgpo": {0: [0.50, 0.72, 0.80, 0.85], 1: [0.50, 0.70, 0.78, 0.83], 2: [0.50, 0.71, 0.82, 0.87]},
    "flow-grpo": {0: [0.50, 0.55, 0.60, 0.66], 1: [0.50, 0.57, 0.62, 0.70], 2: [0.50, 0.53, 0.61, 0.68]},
}
SECONDS = {
    "dgpo": {0: [0, 30, 60, 95], 1: [0, 32, 64, 97], 2: [0, 34, 66, 99]},
    "flow-grpo": {0: [0, 100, 200, 300], 1: [0, 105, 210, 310], 2: [0, 110, 220, 320]},
}
IMAGES_PER_STEP = {"dgpo": 64, "flow-grpo": 48}
NFE_PER_IMAGE = {"dgpo": 14, "flow-grpo": 30}
OOD = {  # final aesthetic and blur per seed
    "dgpo": {"aesthetic": [5.1, 5.3, 5.2], "blur": [0.20, 0.30, 0.25]},
    "flow-grpo": {"aesthetic": [5.4, 5.5, 5.6], "blur": [0.40, 0.45, 0.50]},
}
STEPS = [0, 10, 20, 30]


def mean(xs):
    return sum(xs) / len(xs)


def sample_std(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def cost(method, seed, i):
    images = STEPS[i] * IMAGES_PER_STEP[method]
    return {"train_seconds": SECONDS[method][seed][i], "images": images, "nfe_total": images * NFE_PER_IMAGE[method],
            "reward_calls": images, "wall_seconds": SECONDS[method][seed][i] + 5.0}


def spec(name, objective, sampler, seed, reward="ocr", eval_rewards=("aesthetic", "blur"), budget=None):
    return {"name": name, "backbone": {"name": "nano", "options": {}}, "objective": {"name": objective, "options": {}},
            "sampler": {"name": sampler, "options": {}}, "rewards": [{"name": reward, "weight": 1.0, "options": {}}],
            "budget": budget or {"steps": 30, "seconds": None, "images": None, "reward_calls": None},
            "eval": {"rewards": [{"name": r, "options": {}} for r in eval_rewards], "prompts": 8, "seeds": [0]},
            "seed": seed}


def write_run(path, spec_, base, tuned, higher, final_cost, evals, steps):
    path.mkdir(parents=True)
    result = {"status": "finished", "spec": spec_, "seed": spec_["seed"], "steps": steps,
              "train_reward": spec_["rewards"][0]["name"], "base": base, "tuned": tuned,
              "higher_is_better": higher, "cost": final_cost}
    (path / "result.json").write_text(json.dumps(result))
    lines = [json.dumps({"type": "train", "step": 1, "reward_mean": 0.1, "cost": {}})]
    lines += [json.dumps(e) for e in evals]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def write_suite(root, extra_eval=True):
    """Two methods x three seeds as a suite writes them; one run was resumed and one has an extra eval."""
    sampler = {"dgpo": "ode-euler", "flow-grpo": "flow-sde"}
    for method in CURVES:
        for seed in range(3):
            ocr, evals = CURVES[method][seed], []
            for i, step in enumerate(STEPS):
                scores = {"ocr": ocr[i], "aesthetic": BASE["aesthetic"], "blur": BASE["blur"]}
                if i == len(STEPS) - 1:
                    scores.update({k: OOD[method][k][seed] for k in ("aesthetic", "blur")})
                label = "base" if i == 0 else ("final" if i == len(STEPS) - 1 else f"step{step:05d}")
                evals.append({"type": "eval", "step": step, "label": label, "scores": scores,
                              "cost": cost(method, seed, i)})
            if method == "dgpo" and seed == 1:  # crashed after the step-10 eval, resumed from step 0's checkpoint
                stale = dict(evals[1], scores={**evals[1]["scores"], "ocr": 0.10})
                evals.insert(1, stale)
            if method == "flow-grpo" and seed == 2 and extra_eval:  # an eval only this seed has: not on the curve
                evals.insert(3, {"type": "eval", "step": 25, "label": "step00025",
                                 "scores": {"ocr": 0.99, "aesthetic": 5.0, "blur": 0.3}, "cost": cost(method, seed, 2)})
            final = evals[-1]
            write_run(root / method / f"seed{seed}", spec(method, method, sampler[method], seed), BASE,
                      final["scores"], HIGHER, final["cost"], evals, 30)


@pytest.fixture
def suite_dir(tmp_path):
    write_suite(tmp_path / "ocr-nano")
    return tmp_path / "ocr-nano"


def rows_by_label(section):
    return {r.label: r for r in section.rows}


def test_means_stds_best_and_columns(suite_dir):
    table = build_table(find_runs([suite_dir]), target=None)
    assert [(c.name, c.higher_is_better, c.in_domain) for c in table.columns] == [
        ("ocr", True, True), ("aesthetic", True, False), ("blur", False, False)]
    (section,) = table.sections
    assert section.title == "ocr on nano"
    rows = rows_by_label(section)
    assert list(rows) == ["dgpo", "flow-grpo"]
    for method, row in rows.items():
        finals = {"ocr": [CURVES[method][s][-1] for s in range(3)], **OOD[method]}
        for reward, values in finals.items():
            assert row.scores[reward].mean == pytest.approx(mean(values), rel=1e-12)
            assert row.scores[reward].std == pytest.approx(sample_std(values), rel=1e-12)
        assert row.seeds == [0, 1, 2]
        assert row.cost["train_seconds"].mean == pytest.approx(mean([SECONDS[method][s][-1] for s in range(3)]))
        assert row.cost["images"].mean == 30 * IMAGES_PER_STEP[method]
        assert row.cost["nfe_total"].mean == 30 * IMAGES_PER_STEP[method] * NFE_PER_IMAGE[method]
    # ocr and aesthetic: higher is better; blur: lower is better
    assert rows["dgpo"].best == {"ocr", "blur"}
    assert rows["flow-grpo"].best == {"aesthetic"}
    assert section.base.label == "nano (base)"
    assert {k: v.mean for k, v in section.base.scores.items()} == BASE
    assert section.base.scores["ocr"].std == 0.0


def test_default_target_is_final_score_of_worst_method(suite_dir):
    (section,) = build_table(find_runs([suite_dir]), target=None).sections
    rows = rows_by_label(section)
    target = mean([CURVES["flow-grpo"][s][-1] for s in range(3)])
    assert section.target == pytest.approx(target, rel=1e-12)
    assert section.target_source.startswith("final score of flow-grpo")
    # dgpo's mean curve: 0.5, 0.71, 0.80, 0.85 -> first at or above the target at step 10
    # (the stale pre-resume record of seed 1 at step 10 is replaced by the later one)
    dgpo = rows["dgpo"].to_target
    assert dgpo.step == 10
    assert dgpo.cost["train_seconds"] == pytest.approx(mean([30, 32, 34]))
    assert dgpo.cost["images"] == 10 * 64
    assert dgpo.cost["nfe_total"] == 10 * 64 * 14
    # flow-grpo's mean curve reaches its own final score only at the end (its seed-2-only step-25 eval is ignored)
    fg = rows["flow-grpo"].to_target
    assert fg.step == 30
    assert fg.cost["train_seconds"] == pytest.approx(mean([300, 310, 320]))
    assert [p.step for p in rows["flow-grpo"].curve] == [0, 10, 20, 30]
    assert section.reference == "flow-grpo"
    assert dgpo.speedup["train_seconds"] == pytest.approx(mean([300, 310, 320]) / mean([30, 32, 34]))
    assert dgpo.speedup["images"] == pytest.approx((30 * 48) / (10 * 64))
    assert fg.speedup["train_seconds"] == 1.0


def test_given_target_and_not_reached(suite_dir):
    (section,) = build_table(find_runs([suite_dir]), target=0.75).sections
    rows = rows_by_label(section)
    assert section.target == 0.75 and section.target_source == "given"
    assert rows["dgpo"].to_target.step == 20  # mean curve 0.71 at step 10, 0.80 at step 20
    assert rows["dgpo"].to_target.cost["train_seconds"] == pytest.approx(mean([60, 64, 66]))
    assert rows["flow-grpo"].to_target is None
    assert section.reference == "dgpo" and rows["dgpo"].to_target.speedup["train_seconds"] == 1.0
    text = render(build_table(find_runs([suite_dir]), target=0.75), "markdown")
    assert "not reached" in text.splitlines()[4]


def test_markdown(suite_dir):
    text = render(build_table(find_runs([suite_dir]), target=None), "markdown")
    lines = text.splitlines()
    assert lines[0] == ("| Model | ocr ↑ | aesthetic ↑ | blur ↓ | train time | images | NFEs | time to target "
                        "| speed-up |")
    assert lines[2] == "| nano (base) | 0.500 | 5.000 | 0.350 | – | – | – | – | – |"
    speed = mean([300, 310, 320]) / mean([30, 32, 34])
    assert lines[3] == (f"| dgpo | **0.850 ± 0.020** | 5.200 ± 0.100 | **0.250 ± 0.050** | 97.0 s | 1,920 "
                        f"| 26.9k | 32.0 s | {speed:.1f}× |")
    assert lines[4] == ("| flow-grpo | 0.680 ± 0.020 | **5.500 ± 0.100** | 0.450 ± 0.050 | 5.2 min | 1,440 "
                        "| 43.2k | 5.2 min | 1.0× |")
    assert any("ocr ≥ 0.68" in ln and "relative to flow-grpo" in ln for ln in lines[5:])


def test_csv(suite_dir):
    rows = list(csv.DictReader(io.StringIO(render(build_table(find_runs([suite_dir]), None), "csv"))))
    assert [(r["model"], r["kind"]) for r in rows] == [("nano (base)", "base"), ("dgpo", "method"),
                                                       ("flow-grpo", "method")]
    dgpo = rows[1]
    assert float(dgpo["ocr_mean"]) == pytest.approx(0.85, rel=1e-12)
    assert float(dgpo["ocr_std"]) == pytest.approx(sample_std([0.85, 0.83, 0.87]), rel=1e-12)
    assert (dgpo["ocr_best"], dgpo["aesthetic_best"], dgpo["blur_best"]) == ("1", "0", "1")
    assert float(dgpo["to_target_seconds"]) == pytest.approx(32.0)
    assert float(dgpo["speedup"]) == pytest.approx(310 / 32)
    assert float(rows[2]["target"]) == pytest.approx(0.68, rel=1e-12)
    assert rows[0]["ocr_std"] == "0.0" and rows[0]["train_seconds"] == ""


def test_json(suite_dir):
    data = json.loads(render(build_table(find_runs([suite_dir]), None), "json"))
    (section,) = data["sections"]
    assert section["target"]["reference"] == "flow-grpo"
    dgpo = section["rows"][0]
    assert dgpo["label"] == "dgpo" and dgpo["best"] == ["blur", "ocr"]
    assert dgpo["scores"]["aesthetic"]["values"] == [5.1, 5.3, 5.2]
    assert dgpo["scores"]["blur"]["std"] == pytest.approx(0.05)
    assert dgpo["time_to_target"]["train_seconds"] == pytest.approx(32.0)
    assert [p["step"] for p in dgpo["curve"]] == [0, 10, 20, 30]
    assert dgpo["curve"][1]["score"]["values"] == [0.72, 0.70, 0.71]


def test_latex(suite_dir):
    text = render(build_table(find_runs([suite_dir]), None), "latex")
    body = [ln for ln in text.splitlines() if ln.endswith(r"\\")]
    assert all(ln.count("&") == 8 for ln in body[1:])  # 1 + 3 scores + 5 cost columns
    assert body[0] == (r" & \multicolumn{1}{c}{In-domain} & \multicolumn{2}{c}{Out-of-domain} & "
                       r"\multicolumn{5}{c}{Cost} \\")
    assert r"dgpo & \textbf{0.850} $\pm$ 0.020 & 5.200 $\pm$ 0.100 & \textbf{0.250} $\pm$ 0.050 & 97.0 s" in text
    assert r"flow-grpo & 0.680 $\pm$ 0.020 & \textbf{5.500} $\pm$ 0.100" in text
    assert r"nano (base) & 0.500 & 5.000 & 0.350 & -- & --" in text
    assert text.splitlines()[0].startswith(r"\begin{tabular}{lc|cc|rrrrr}")
    assert r"\end{tabular}" in text


def test_rich(suite_dir):
    console = Console(record=True, width=250)
    console.print(render(build_table(find_runs([suite_dir]), None), "rich"))
    text = console.export_text()
    assert "0.850 ± 0.020" in text and "5.500 ± 0.100" in text and "nano (base)" in text
    with pytest.raises(SpecError, match="Unknown format 'html'"):
        render(build_table(find_runs([suite_dir]), None), "html")


def test_sections_per_training_reward_and_labels(tmp_path):
    """Two tasks give two sections with their own base rows; ad-hoc runs of one objective
    with different samplers stay apart."""
    higher = {"ocr": True, "count": True, "aesthetic": True}
    for i, (reward, sampler, seed, score) in enumerate([("ocr", "ode-euler", 0, 0.8), ("ocr", "ode-euler", 1, 0.9),
                                                          ("ocr", "flow-sde", 0, 0.6), ("count", "ode-euler", 0, 0.7)]):
        s = spec(None, "dgpo", sampler, seed, reward=reward, eval_rewards=("aesthetic",))
        base = {reward: 0.4, "aesthetic": 5.0 + i}
        tuned = {reward: score, "aesthetic": 5.5}
        evals = [{"type": "eval", "step": 0, "label": "base", "scores": base, "cost": {}},
                 {"type": "eval", "step": 5, "label": "final", "scores": tuned,
                  "cost": {"train_seconds": 10.0 * (i + 1), "images": 80, "nfe_total": 800}}]
        write_run(tmp_path / f"r{i}", s, base, tuned, higher, evals[-1]["cost"], evals, 5)
    table = build_table(find_runs([tmp_path]), None)
    assert [(c.name, c.in_domain) for c in table.columns] == [("ocr", True), ("count", True), ("aesthetic", False)]
    ocr, count = table.sections
    assert (ocr.title, count.title) == ("ocr on nano", "count on nano")
    assert [r.label for r in ocr.rows] == ["dgpo [ode-euler] (n=2)", "dgpo [flow-sde] (n=1)"]
    assert ocr.rows[0].scores["ocr"].values == [0.8, 0.9]
    assert ocr.base.scores["aesthetic"].mean == pytest.approx(mean([5.0, 6.0, 7.0]))
    assert "count" not in ocr.rows[0].scores
    assert ocr.target == 0.6 and ocr.reference == "dgpo [flow-sde] (n=1)"
    assert ocr.rows[0].to_target.cost["train_seconds"] == pytest.approx(15.0)
    assert ocr.rows[0].to_target.speedup["train_seconds"] == pytest.approx(30.0 / 15.0)
    md = render(table, "markdown").splitlines()
    assert md[2] == "| *ocr on nano* | | | | | | | | |"
    assert md[7] == "| nano (base) | – | 0.400 | 8.000 | – | – | – | – | – |"
    assert md[8].startswith("| dgpo | – | **0.700** | **5.500** |")
    assert r"\textit{count on nano}" in render(table, "latex")


def test_unequal_budgets_are_flagged(tmp_path):
    write_suite(tmp_path / "s", extra_eval=False)
    path = tmp_path / "s" / "dgpo" / "seed0" / "result.json"
    result = json.loads(path.read_text())
    result["spec"]["budget"]["steps"] = 40
    path.write_text(json.dumps(result))
    (section,) = build_table(find_runs([tmp_path / "s"]), None).sections
    assert any("different budgets" in n for n in section.notes)
    assert "different budgets" in render(build_table(find_runs([tmp_path / "s"]), None), "markdown")


def test_plots_and_sample_grid(suite_dir, tmp_path):
    colours = {"base": (255, 0, 0), "dgpo": (0, 255, 0), "flow-grpo": (0, 0, 255)}
    for method in CURVES:
        for seed in range(3):
            samples = suite_dir / method / f"seed{seed}" / "samples"
            samples.mkdir()
            Image.new("RGB", (64, 48), colours["base"]).save(samples / "base.png")
            Image.new("RGB", (64, 48), colours[method] if seed == 0 else (9, 9, 9)).save(samples / "final.png")
    runs = find_runs([suite_dir])
    written = write_plots(runs, build_table(runs, None), tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["comparison_samples.png", "comparison_score_vs_images.png", "comparison_score_vs_seconds.png"]
    for p in written:
        assert Image.open(p).format == "PNG"
    grid = np.asarray(Image.open(tmp_path / "plots" / "comparison_samples.png").convert("RGB"))
    # three panels (base, dgpo seed 0, flow-grpo seed 0), each upscaled 6x to 384 px wide
    assert grid.shape[1] == 3 * 384 + 4 * 8
    row = grid[8 + 16 + 100]
    for k, name in enumerate(["base", "dgpo", "flow-grpo"]):
        x0 = 8 + k * (384 + 8)
        assert (row[x0:x0 + 384] == colours[name]).all()


def test_rich_shows_labels_with_brackets_verbatim(tmp_path):
    """Row labels such as 'dgpo [flow-sde]' are text, not rich markup."""
    for i, sampler in enumerate(["ode-euler", "flow-sde"]):
        s = spec(None, "dgpo", sampler, 0, eval_rewards=())
        evals = [{"type": "eval", "step": 3, "label": "final", "scores": {"ocr": 0.5 + i / 10},
                  "cost": {"train_seconds": 1.0, "images": 8, "nfe_total": 80}}]
        write_run(tmp_path / f"r{i}", s, {"ocr": 0.4}, {"ocr": 0.5 + i / 10}, {"ocr": True}, evals[0]["cost"], evals, 3)
    console = Console(record=True, width=250)
    console.print(render(build_table(find_runs([tmp_path]), None), "rich"))
    text = console.export_text()
    assert "dgpo [ode-euler]" in text and "dgpo [flow-sde]" in text
    assert "final score of dgpo [ode-euler], the method that ends worst" in " ".join(text.split())


def test_methods_with_fewer_seeds_say_so(suite_dir):
    import shutil

    shutil.rmtree(suite_dir / "flow-grpo" / "seed2")  # a cell that never finished
    (section,) = build_table(find_runs([suite_dir]), None).sections
    assert [r.label for r in section.rows] == ["dgpo (n=3)", "flow-grpo (n=2)"]
    assert section.rows[1].scores["ocr"].values == [0.66, 0.70]


def test_a_run_passed_twice_counts_once_and_duplicate_seeds_are_refused(suite_dir, tmp_path):
    runs = find_runs([suite_dir, suite_dir / "dgpo"])
    (section,) = build_table(runs, None).sections
    assert [len(r.runs) for r in section.rows] == [3, 3]
    import shutil

    shutil.copytree(suite_dir / "dgpo" / "seed1", tmp_path / "copy")
    with pytest.raises(SpecError, match="same method with the same seed"):
        build_table(find_runs([suite_dir, tmp_path / "copy"]), None)


def test_a_target_the_base_model_already_reaches_is_flagged(suite_dir):
    (section,) = build_table(find_runs([suite_dir]), target=0.5).sections
    assert all(r.to_target.step == 0 and r.to_target.cost["train_seconds"] == 0 for r in section.rows)
    assert all(r.to_target.speedup["train_seconds"] is None for r in section.rows)
    assert any("base model already reaches the target" in n for n in section.notes)
    (section,) = build_table(find_runs([suite_dir]), target=0.51).sections
    assert section.notes == []


def test_unfinished_runs_are_named_not_counted(suite_dir, capsys):
    from dgpo_bench.cli import main

    running = suite_dir / "dgpo" / "seed9"
    running.mkdir()
    (running / "spec.resolved.json").write_text("{}")
    assert main(["compare", str(suite_dir), "--format", "json"]) == 0
    cap = capsys.readouterr()
    assert f"left out, not finished: {running}" in " ".join(cap.err.split())
    assert all(len(r["scores"]["ocr"]["values"]) == 3 for r in json.loads(cap.out)["sections"][0]["rows"])
