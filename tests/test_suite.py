"""Suites: parsing, resolution of every cell, equal-budget checks, and a tiny suite through
the CLI (skipping finished cells, going on after a failing one, resuming, compare)."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

import dgpo_bench
from dgpo_bench.errors import SpecError
from dgpo_bench.plugins import get_plugin_manager, load_components
from dgpo_bench.suite import is_suite, load_suite

ROOT = Path(__file__).resolve().parent.parent

SUITE = """
name = "two-way"
seeds = [0, 1, 2]

[base]
backbone = { name = "nano" }
rewards = [{ name = "ocr" }]
group_size = 4
prompts_per_step = 2
[base.budget]
images = 64
[base.eval]
prompts = 8
every = 2

[[entry]]
name = "dgpo"
objective = "dgpo"
options = { dgpo = { beta_kl = 0.5 } }

[[entry]]
name = "grpo-sde"
objective = { name = "flow-grpo" }
sampler = "flow-sde"
group_size = 8
"""


def write(tmp_path, text, name="suite.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, needle", [
    (("[base.budget]\nimages = 64\n", ""), "has no budget"),
    (("images = 64", "steps = 3\nimages = 64"), None),
    (('name = "dgpo"\n', 'name = "dgpo"\nbudget = { steps = 2 }\n'), "sets budget, which a suite holds equal"),
    (('name = "dgpo"\n', 'name = "dgpo"\neval = { every = 1 }\n'), "sets eval, which a suite holds equal"),
    (('name = "dgpo"\n', 'name = "dgpo"\nseed = 3\n'), "sets seed"),
    (('name = "dgpo"\n', 'name = "dgpo"\nlearning_rate = 3\n'), "unknown setting 'learning_rate'"),
    (('name = "grpo-sde"', 'name = "dgpo"'), "entry name 'dgpo' is used twice"),
    (('name = "grpo-sde"', 'name = "grpo/sde"'), "needs a name of letters"),
    (('objective = { name = "flow-grpo" }\n', ""), "names neither an objective nor a preset"),
    (("seeds = [0, 1, 2]", "seeds = [0, 0]"), "seeds must be a list of distinct integers"),
    (("seeds = [0, 1, 2]", "seeds = [0]\nbudget = 3"), "unknown top-level setting 'budget'"),
    (("group_size = 4\n", "group_size = 4\nseed = 1\n"), "[base] sets 'seed'"),
    (("options = { dgpo = { beta_kl = 0.5 } }", "options = { beta_kl = 0.5 }"), "options must map components"),
    (('objective = "dgpo"', "objective = 3"), "'objective' must be a name"),
])
def test_suite_shape_errors(tmp_path, edit, needle):
    text = SUITE.replace(*edit)
    assert text != SUITE
    path = write(tmp_path, text)
    if needle is None:
        assert load_suite(path).base["budget"] == {"steps": 3, "seconds": None, "images": 64, "reward_calls": None}
        return
    with pytest.raises(SpecError) as info:
        load_suite(path)
    assert needle in str(info.value)


def test_is_suite(tmp_path):
    assert is_suite(write(tmp_path, SUITE))
    assert not is_suite(write(tmp_path, 'objective = { name = "dgpo" }\n', "run.toml"))
    assert not is_suite(write(tmp_path, "[[entry]\n", "broken.toml"))
    assert not is_suite(tmp_path / "missing.toml")


def test_cells_are_full_specs_with_the_fixed_part_equal(tmp_path, components):
    suite = load_suite(write(tmp_path, SUITE), ["ocr.threads=1"])
    cells = suite.cells(components)
    assert [c.name for c in cells] == ["dgpo/seed0", "dgpo/seed1", "dgpo/seed2",
                                       "grpo-sde/seed0", "grpo-sde/seed1", "grpo-sde/seed2"]
    assert cells[4].run_dir(Path("runs/two-way")) == Path("runs/two-way/grpo-sde/seed1")
    for cell in cells:
        spec = cell.resolved.spec
        assert spec.name == cell.entry and spec.seed == cell.seed
        # exactly the suite's budget: the default step limit is off
        assert spec.budget.model_dump() == {"steps": None, "seconds": None, "images": 64, "reward_calls": None}
        assert spec.eval.every == 2 and spec.eval.prompts == 8
        assert spec.rewards[0].options["threads"] == 1
    dgpo, grpo = cells[0].resolved, cells[3].resolved
    assert dgpo.objective[0].name == "dgpo" and dgpo.objective[1].beta_kl == 0.5
    assert (dgpo.spec.group_size, grpo.spec.group_size) == (4, 8)
    assert grpo.objective[0].name == "flow-grpo" and grpo.sampler[0].name == "flow-sde"
    fixed = ("backbone", "rewards", "eval", "budget", "prompts")
    first = {k: cells[0].resolved.resolved_dict()[k] for k in fixed}
    assert all({k: c.resolved.resolved_dict()[k] for k in fixed} == first for c in cells)


def test_cell_errors_name_the_entry(tmp_path, components):
    path = write(tmp_path, SUITE.replace('sampler = "flow-sde"', 'sampler = "ode-euler"'))
    with pytest.raises(SpecError, match="entry 'grpo-sde': Objective 'flow-grpo' needs a sampler"):
        load_suite(path).cells(components)
    path = write(tmp_path, SUITE.replace("beta_kl = 0.5", "beta_kll = 0.5"))
    with pytest.raises(SpecError, match="entry 'dgpo'.*beta_kll"):
        load_suite(path).cells(components)


class SlowEvalPreset:
    """A third-party preset that (wrongly, for a suite) changes the evaluation protocol."""

    __name__ = "slow-eval-preset"

    @staticmethod
    @dgpo_bench.hookimpl
    def register_presets(register):
        register("dgpo-rare-eval", {"objective": {"name": "dgpo"}, "eval": {"every": 7, "batch_size": 4}},
                 "DGPO, evaluated rarely")


def test_a_preset_cannot_change_what_the_suite_holds_equal(tmp_path):
    comps = load_components(get_plugin_manager(plugins=[SlowEvalPreset]))
    text = SUITE.replace('objective = "dgpo"', 'preset = "dgpo-rare-eval"')
    with pytest.raises(SpecError) as info:  # eval.every is set in [base]; eval.batch_size is not
        load_suite(write(tmp_path, text)).cells(comps)
    msg = str(info.value)
    assert "entries 'dgpo' and 'grpo-sde' resolve to different eval.batch_size (4 vs 64)" in msg
    assert "set it in [base]" in msg
    fixed = text.replace("prompts = 8\n", "prompts = 8\nbatch_size = 6\n")
    cells = load_suite(write(tmp_path, fixed)).cells(comps)
    assert {(c.resolved.spec.eval.batch_size, c.resolved.spec.eval.every) for c in cells} == {(6, 2)}
    assert cells[0].resolved.spec.preset == "dgpo-rare-eval"


def test_allow_differences_exempts_named_paths_only(tmp_path, components):
    text = SUITE.replace('options = { dgpo = { beta_kl = 0.5 } }',
                         'options = { dgpo = { beta_kl = 0.5 }, backbone = { lora_rank = 4 } }')
    with pytest.raises(SpecError, match="different backbone.options.lora_rank"):
        load_suite(write(tmp_path, text)).cells(components)
    allowed = 'allow_differences = ["backbone.options.lora_rank"]\n' + text
    cells = load_suite(write(tmp_path, allowed)).cells(components)
    assert [c.resolved.backbone[1].lora_rank for c in cells[::3]] == [4, 0]
    with pytest.raises(SpecError, match="budget and eval are always equal"):
        load_suite(write(tmp_path, 'allow_differences = ["eval.every"]\n' + text))


SHIPPED = sorted((ROOT / "benchmarks").glob("*.toml"))


def test_the_shipped_suites_are_all_there():
    assert [p.name for p in SHIPPED] == ["compositional-nano.toml", "geneval-sd35m.toml", "ocr-nano.toml",
                                         "ocr-sd35m.toml", "pickscore-sd35m.toml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_suites_validate_without_weights(path, capsys, monkeypatch):
    """validate resolves every cell and builds no model: no SD3.5 weights are needed here."""
    from dgpo_bench.cli import main

    monkeypatch.delenv("DGPO_BENCH_SD3_PATH", raising=False)
    assert is_suite(path)
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    suite = load_suite(path)
    assert f"valid suite '{suite.name}', {len(suite.entries) * len(suite.seeds)} runs" in " ".join(out.out.split())
    assert {e.settings.get("preset", "").rsplit("-", 1)[0] for e in suite.entries} == {
        "dgpo", "flow-grpo", "diffusion-dpo"}
    assert suite.name == path.stem and len(suite.seeds) == (3 if "nano" in path.stem else 1)


# --------------------------------------------------------------------------- a tiny suite through the CLI

TINY_SUITE = """
name = "tiny"
seeds = [0, 1]

[base]
backbone = {{ name = "nano", options = {{ weights = "{weights}" }} }}
rewards = [{{ name = "ocr" }}]
group_size = 2
prompts_per_step = 2
checkpoint_every = 1
[base.budget]
steps = 2
[base.eval]
sampler = {{ name = "ode-euler", options = {{ steps = 2 }} }}
rewards = [{{ name = "sharpness" }}]
prompts = {prompts}
batch_size = 4
every = 1
grid = 4

[[entry]]
name = "dgpo"
objective = "dgpo"
options = {{ sampler = {{ steps = 3 }}, dgpo = {{ num_timesteps = 1, trunc_steps = 1 }} }}

[[entry]]
name = "flow-grpo"
objective = "flow-grpo"
options = {{ sampler = {{ steps = 3 }} }}
"""


def interrupt_after_first_checkpoint(monkeypatch, run_dir):
    """Ctrl-C (a KeyboardInterrupt in the main thread) once the run in ``run_dir`` has written
    its first checkpoint: at a fixed point, however loaded the machine is."""
    from dgpo_bench.engine import Engine

    save = Engine._save_checkpoint

    def save_then_interrupt(engine, step, base):
        save(engine, step, base)
        if engine.run_dir == run_dir:
            raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "_save_checkpoint", save_then_interrupt)


def bench(capsys, *argv):
    from dgpo_bench.cli import main

    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, " ".join(cap.err.split())


def test_tiny_suite_runs_skips_recovers_and_compares(tmp_path, tiny_weights, capsys, sharpness_plugin):
    suite = write(tmp_path, TINY_SUITE.format(weights=tiny_weights, prompts=4), "tiny.toml")
    out = tmp_path / "runs"

    # an interrupted suite: Ctrl-C in the second dgpo cell once its first checkpoint is on disk
    with pytest.MonkeyPatch.context() as mp:
        interrupt_after_first_checkpoint(mp, out / "dgpo" / "seed1")
        code, _, err = bench(capsys, "bench", str(suite), "--out", str(out), "--only", "dgpo")
    assert code == 130 and "Interrupted" in err, err
    done = (out / "dgpo" / "seed0" / "result.json").read_bytes()
    assert not (out / "dgpo" / "seed1" / "result.json").exists() and not (out / "flow-grpo").exists()
    code, _, err = bench(capsys, "bench", str(suite), "--out", str(out), "--dry-run")
    assert code == 0 and [err.count(s) for s in ("finished", "will resume", "to run")] == [1, 1, 2]

    # one cell cannot start (a damaged checkpoint); the others run and the command fails at the end
    broken = out / "flow-grpo" / "seed1" / "checkpoint"
    broken.mkdir(parents=True)
    (broken / "engine.json").write_text("{}")
    (broken / "trainable.safetensors").write_bytes(b"not a tensor file")
    code, _, err = bench(capsys, "bench", str(suite), "--out", str(out))
    assert code == 2
    assert "1 of 4 cells of suite 'tiny' failed (flow-grpo/seed1: The checkpoint in" in err
    assert err.count("finished earlier, skipped") == 1 and "dgpo/seed1: dgpo with dpm-solver, steps 2 (resuming)" in err
    assert (out / "dgpo" / "seed0" / "result.json").read_bytes() == done
    train = [json.loads(x) for x in (out / "dgpo" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in train if m["type"] == "train"]
    assert steps.count(1) == 1 and set(steps) == {1, 2}  # the step before the checkpoint was not redone
    assert (out / "flow-grpo" / "seed0" / "result.json").is_file()
    assert not (out / "flow-grpo" / "seed1" / "result.json").exists()
    assert "MissingWeightsError" in (out / "flow-grpo" / "seed1" / "error.log").read_text()

    # fixed: rerunning the same command runs only the failed cell
    shutil.rmtree(broken)
    code, _, err = bench(capsys, "bench", str(suite), "--out", str(out))
    assert code == 0, err
    status = json.loads((out / "suite.json").read_text())
    assert [(c["cell"], c["status"]) for c in status["cells"]] == [
        ("dgpo/seed0", "finished"), ("dgpo/seed1", "finished"), ("flow-grpo/seed0", "finished"),
        ("flow-grpo/seed1", "ran")]
    assert not (out / "flow-grpo" / "seed1" / "error.log").exists()
    assert (out / "suite.toml").read_text() == suite.read_text()

    results = {(m, s): json.loads((out / m / f"seed{s}" / "result.json").read_text())
               for m in ("dgpo", "flow-grpo") for s in (0, 1)}
    for (m, s), res in results.items():
        assert res["spec"]["name"] == m and res["seed"] == s and res["steps"] == 2
        assert res["spec"]["budget"] == {"steps": 2, "seconds": None, "images": None, "reward_calls": None}
        assert set(res["tuned"]) == {"ocr", "sharpness"}
        assert res["cost"]["images"] == 8 and res["cost"]["optimizer_steps"] == 2
        # per-prompt scores of the base and tuned weights, the base's kept across the resume of dgpo/seed1
        per_prompt = json.loads((out / m / f"seed{s}" / "per_prompt.json").read_text())
        for when, scores in (("base", res["base"]), ("final", res["tuned"])):
            assert {k: sum(v) / len(v) for k, v in per_prompt[when].items()} == pytest.approx(scores, rel=1e-12)
    assert results["dgpo", 0]["spec"]["sampler"]["name"] == "dpm-solver"
    assert results["flow-grpo", 0]["spec"]["sampler"]["name"] == "flow-sde"

    # compare reads the suite directory back: a row per method, both rewards, per-seed means
    code, stdout, err = bench(capsys, "compare", str(out), "--format", "json", "--plots", str(tmp_path / "plots"))
    assert code == 0, err
    (section,) = json.loads(stdout)["sections"]
    assert [c["name"] for c in json.loads(stdout)["columns"]] == ["ocr", "sharpness"]
    for row in section["rows"]:
        for reward in ("ocr", "sharpness"):
            values = [results[row["label"], s]["tuned"][reward] for s in (0, 1)]
            assert row["scores"][reward]["values"] == values
            assert row["scores"][reward]["mean"] == pytest.approx(sum(values) / 2, rel=1e-12)
        assert [p["step"] for p in row["curve"]] == [0, 1, 2]  # base, step 1, final (not also a step-2 point)
    assert [r["label"] for r in section["rows"]] == ["dgpo", "flow-grpo"]
    assert section["base"]["scores"]["ocr"]["values"] == [results[k]["base"]["ocr"] for k in sorted(results)]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "comparison_samples.png", "comparison_score_vs_images.png", "comparison_score_vs_seconds.png"]
    code, stdout, _ = bench(capsys, "compare", str(out), "--format", "markdown")
    assert code == 0 and stdout.splitlines()[0].startswith("| Model | ocr ↑ | sharpness ↑ |")

    # a finished cell is never mixed with cells of a changed suite
    suite.write_text(TINY_SUITE.format(weights=tiny_weights, prompts=3))
    code, _, err = bench(capsys, "bench", str(suite), "--out", str(out), "--only", "dgpo/seed0")
    assert code == 2 and "finished with a different spec than the suite now gives" in err
    assert (out / "dgpo" / "seed0" / "result.json").read_bytes() == done


def test_cells_in_parallel_match_cells_in_sequence(tmp_path, tiny_weights, capsys, sharpness_plugin):
    """--jobs 2 runs cells in worker processes (one CPU thread each here) with the same results."""
    suite = write(tmp_path, TINY_SUITE.format(weights=tiny_weights, prompts=4), "tiny.toml")
    code, _, err = bench(capsys, "bench", str(suite), "--out", str(tmp_path / "seq"), "--only", "dgpo/seed1")
    assert code == 0, err
    code, _, err = bench(capsys, "bench", str(suite), "--out", str(tmp_path / "par"), "--only", "dgpo", "--jobs", "2")
    assert code == 0, err
    assert "2 at a time" in err  # (the workers print to the terminal, not to capsys)
    status = json.loads((tmp_path / "par" / "suite.json").read_text())
    assert [(c["cell"], c["status"]) for c in status["cells"]] == [("dgpo/seed0", "ran"), ("dgpo/seed1", "ran")]
    seq, par = (json.loads((tmp_path / d / "dgpo" / "seed1" / "result.json").read_text()) for d in ("seq", "par"))
    assert par["tuned"] == seq["tuned"] and par["base"] == seq["base"]
