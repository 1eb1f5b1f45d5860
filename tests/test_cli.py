"""The CLI: its error boundary, clean JSON on stdout, and run / eval end to end on a tiny model."""

import json

import pytest

from dgpo_bench.cli import main


def _main(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("argv, needle", [
    (["run", "--objective", "dgpp", "--reward", "ocr", "--dry-run"], "Unknown objective 'dgpp'. Did you mean 'dgpo'"),
    (["run", "--reward", "orc", "--dry-run"], "Unknown reward 'orc'. Did you mean 'ocr'"),
    (["run", "--objective", "flow-grpo", "--sampler", "ode-euler", "--dry-run"], "needs a sampler that provides log_probs"),
    (["run", "--objective", "flow-grpo", "-o", "sampler.noise_level=0", "--dry-run"], "'flow-sde' as set has none"),
    (["run", "-o", "dgpo.nope=1", "--dry-run"], "has no option 'nope'"),
    (["run", "-o", "dgpo.beta_kl", "--dry-run"], "COMPONENT.KEY=VALUE"),
    (["run", "-o", "pickle.x=1", "--dry-run"], "not a component of this run"),
    (["run", "--group-size", "1", "--dry-run"], "group_size"),
    (["run", "--eval-every", "-1", "--dry-run"], "Invalid setting 'eval.every' in the command line"),
    (["run", "--config", "/no/such/file.toml", "--dry-run"], "does not exist"),
    (["run", "--backbone", "nano", "-o", "nano.weights=/no/such/dir", "--steps", "1"], "/no/such/dir"),
    (["eval", "/no/such/run", "--reward", "ocr"], "not a run directory"),
    (["compare", "/no/such/dir"], "does not exist"),
    (["compare", "/no/such/[base]"], "/no/such/[base] does not exist"),  # brackets are not markup
    (["run", "--nope"], "No such option: --nope"),
    (["run", "--updates-per-rollout", "0", "--dry-run"], "Invalid setting 'updates_per_rollout'"),
    (["run", "--updates-per-rollout", "3", "--dry-run"], "updates_per_rollout=3 must divide prompts_per_step=8"),
    (["run", "-o", "nano.compile=maybe", "--dry-run"],
     "Invalid option compile for backbone 'nano': Input should be 'auto', 'on' or 'off' (got 'maybe')."),
])
def test_user_errors_are_one_sentence_and_exit_2(capsys, monkeypatch, tmp_path, argv, needle):
    monkeypatch.chdir(tmp_path)  # a run that fails after starting writes its default runs/ folder here
    code, out, err = _main(capsys, *argv)
    assert code == 2
    assert needle in " ".join(err.split())
    assert "Traceback" not in err and out == ""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 is refused only on a CPU")
def test_fp16_on_a_cpu_is_one_sentence_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    # a fresh process: accelerate reads the mixed precision that 'accelerate launch --mixed_precision fp16' sets once
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="fp16", HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "dgpo-bench"), "run", "--steps", "1", "--eval-prompts", "1",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "mixed_precision fp16 needs a GPU" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def _run_with_env(tmp_path, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([str(Path(sys.executable).parent / "dgpo-bench"), "run", "--steps", "1", "--eval-prompts",
                           "1", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **env))


def test_an_accelerate_config_whose_package_is_missing_is_one_sentence_and_exit_2(tmp_path):
    proc = _run_with_env(tmp_path, ACCELERATE_USE_MEGATRON_LM="true")  # what launch sets for a Megatron-LM config
    assert proc.returncode == 2 and "needs a package that is not installed" in " ".join(proc.stderr.split())
    assert "Megatron" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("env, needle", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO stage 3 shards the parameters"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "gradient_accumulation_steps is 4"),
    ({"ACCELERATE_GRADIENT_CLIPPING": "0.5"}, "clips gradients at 0.5 but the objective's grad_clip is 1.0"),
])
def test_deepspeed_settings_the_engine_cannot_honour_are_one_sentence_and_exit_2(tmp_path, env, needle):
    # what accelerate launch --use_deepspeed sets, for one process
    launch = dict(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", CUDA_VISIBLE_DEVICES="")
    proc = _run_with_env(tmp_path, **{**launch, **env})
    assert proc.returncode == 2 and needle in " ".join(proc.stderr.split()), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout  # DeepSpeed logs its accelerator on stdout


def test_debug_shows_the_traceback(capsys):
    from dgpo_bench.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError):
        main(["--debug", "run", "--objective", "dgpp", "--dry-run"])


def test_dry_run_prints_the_resolved_spec_as_json(capsys):
    code, out, err = _main(capsys, "run", "--objective", "dgpo", "--reward", "ocr", "--dry-run",
                           "--steps", "7", "-o", "dgpo.beta_kl=0.5")
    assert code == 0
    spec = json.loads(out)
    assert spec["budget"]["steps"] == 7
    assert spec["objective"]["options"]["beta_kl"] == 0.5
    assert spec["sampler"]["name"] == "dpm-solver"
    assert "lr" in spec["objective"]["options"]


def test_plugins_json_lists_every_kind(capsys):
    code, out, _ = _main(capsys, "plugins", "--json")
    assert code == 0
    rows = json.loads(out)["components"]
    kinds = {r["kind"] for r in rows}
    assert {"backbone", "sampler", "objective", "reward", "preset"} <= kinds
    assert all(r["plugin"] and r["version"] for r in rows)


def _tiny_run_args(weights, out):
    """A run on the tiny nano checkpoint: 4 rollout images a step, 2-step samplers, 2 held-out prompts."""
    return ["--objective", "dgpo", "--group-size", "2", "--prompts-per-step", "2",
            "--eval-prompts", "2", "-o", f"nano.weights={weights}", "-o", "sampler.steps=2", "-o",
            "eval-sampler.steps=2", "-o", "dgpo.num_timesteps=1", "-o", "dgpo.trunc_steps=1", "--out", str(out)]


def test_run_then_eval_print_json_only_on_stdout(capsys, tmp_path, tiny_weights):
    run_dir = tmp_path / "run"
    code, out, err = _main(capsys, "run", "--reward", "ocr", "--steps", "1", *_tiny_run_args(tiny_weights, run_dir),
                           "--json")
    assert code == 0, err
    summary = json.loads(out)  # the whole of stdout is one JSON object
    assert isinstance(summary, dict) and {"run_dir", "base", "tuned", "cost"} <= set(summary)
    assert summary["cost"]["images"] == 4 and set(summary["tuned"]) == {"ocr"}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["seed"] == 0 and result["steps"] == 1
    assert result["environment"]["versions"]["torch"] and "git_revision" in result["environment"]
    assert isinstance(result["environment"]["cpu"]["native_bf16"], bool)
    assert (run_dir / "samples" / "base.png").stat().st_size > 0 and (run_dir / "samples" / "final.png").is_file()
    # the weights were written beside, then renamed: no temporary folder is left
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []

    code, out, err = _main(capsys, "eval", str(run_dir), "--seed", "0", "--json")  # the run's own 2 held-out prompts
    assert code == 0, err
    scores = json.loads(out)
    assert list(scores) == ["ocr"] and isinstance(scores["ocr"], float)
    assert scores["ocr"] == result["tuned"]["ocr"]  # same weights, prompts, seed and sampler as the final eval

    code, out, err = _main(capsys, "eval", str(run_dir), "--reward", "compositional")  # another world's reward
    assert code == 2 and out == ""
    assert "was trained in the text world (reward 'ocr') but reward 'compositional' scores the shapes world" in " ".join(err.split())


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    from dgpo_bench.results import write_atomic

    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "result.json", b"{}")
        (tmp_path / "plain.json").write_bytes(b"{}")
    finally:
        os.umask(umask)
    mode = (tmp_path / "result.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    assert (tmp_path / "result.json").read_bytes() == b"{}" and sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.json", "result.json"]


def test_a_folder_replaced_atomically_is_kept_whole_when_writing_fails(tmp_path):
    from dgpo_bench.results import replaced_atomically

    folder = tmp_path / "weights"
    for version in ("one", "two"):
        with replaced_atomically(folder) as tmp:
            assert tmp.parent == tmp_path and not any(tmp.iterdir())
            (tmp / "w.bin").write_text(version)
    with pytest.raises(OSError):
        with replaced_atomically(folder) as tmp:
            (tmp / "w.bin").write_text("half")
            raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["weights"] and (folder / "w.bin").read_text() == "two"


BROKEN_PLUGIN = "import dgpo_bench_no_such_module\n"


def test_a_broken_plugin_file_is_a_warning_unless_strict(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text(BROKEN_PLUGIN)
    monkeypatch.setenv("DGPO_BENCH_PLUGINS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="'dir:broken' failed to load and was skipped"):
        code, out, _ = _main(capsys, "plugins", "--json")
    assert code == 0
    assert json.loads(out)["failures"][0]["plugin"] == "dir:broken"

    code, out, err = _main(capsys, "--strict-plugins", "plugins", "--json")
    assert code == 2 and out == ""
    message = " ".join(err.split())
    assert message.startswith("Error: Plugin 'dir:broken' failed to load (ModuleNotFoundError")
    assert message.count(". ") == 0 and message.endswith("fix or uninstall it.")


@pytest.mark.parametrize("budget, steps", [({"steps": None, "images": 6}, 2), ({"steps": None, "seconds": 1e-3}, 1)])
def test_progress_bars_have_totals_and_stay_off_stdout(capsys, tmp_path, tiny_weights, monkeypatch, budget, steps):
    from dgpo_bench.progress import ProgressReporter

    finished = []  # (bar, total, completed) of every bar as it is taken down
    take_down = ProgressReporter.finish

    def record(self, task):
        bar = next(t for t in self._bar.tasks if t.id == task)
        finished.append((bar.description.split(" (")[0], bar.total, bar.completed))
        take_down(self, task)

    monkeypatch.setattr(ProgressReporter, "finish", record)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws live bars, as on a terminal
    config = tmp_path / "budget.json"
    config.write_text(json.dumps({"budget": budget}))
    code, out, err = _main(capsys, "run", "--reward", "ocr", "--config", str(config),
                           *_tiny_run_args(tiny_weights, tmp_path / "run"), "--json")
    assert code == 0, err
    result = json.loads(out)  # stdout holds the JSON alone while the bars draw on stderr
    assert result["steps"] == steps  # 4 images a step: 2 steps reach 6 images; any step passes 1 ms
    # with no step count to aim at, the train bar counts training seconds against the budget's
    train = (steps, steps) if "images" in budget else (1e-3, pytest.approx(result["cost"]["train_seconds"], abs=1e-3))
    assert finished == [("eval", 2, 2), *[("rollout", 4, 4)] * steps, ("train", *train), ("eval", 2, 2)]


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys, tmp_path, tiny_weights, monkeypatch):
    from dgpo_bench.progress import ProgressReporter

    monkeypatch.delenv("FORCE_COLOR", raising=False)  # rich would take it for a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setattr(ProgressReporter, "plain_interval", 0.0)  # a line for every update
    config = tmp_path / "budget.json"
    config.write_text(json.dumps({"budget": {"steps": 2}}))
    code, out, err = _main(capsys, "run", "--reward", "ocr", "--config", str(config),
                           *_tiny_run_args(tiny_weights, tmp_path / "run"), "--json")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("train (reward ")]
    assert [line.split(": ")[1].split(",")[0] for line in lines] == ["1/2", "2/2"]
    assert all(" elapsed, eta " in line for line in lines)
    assert json.loads(out)["steps"] == 2
