"""Reward servers: a real server process on loopback and the ``remote`` reward that calls it."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dgpo_bench.contracts import LoadContext, Prompt
from dgpo_bench.errors import RewardError
from dgpo_bench_rewards.ocr import OcrReward
from dgpo_bench_rewards.remote import RemoteReward
from dgpo_bench_tasks.shapes import render_scene
from dgpo_bench_tasks.text import render_text

CPU = LoadContext(device=torch.device("cpu"))
CLI = Path(sys.executable).parent / "dgpo-bench"


def start_server(command: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server with --port 0 and read the URL it prints."""
    proc = subprocess.Popen(command + ["--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("Serving reward"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.split(" at ")[1].strip()


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


@pytest.fixture(scope="module")
def ocr_server():
    proc, url = start_server([str(CLI), "serve-reward", "ocr", "-o", "threads=1"])
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def text_batch():
    prompts = OcrReward().prompts("eval")[:6]
    rng = np.random.default_rng(0)
    shown = [p.metadata["target"] if i % 2 else "wrong words" for i, p in enumerate(prompts)]
    return np.stack([render_text(s, rng) for s in shown]), prompts


def test_remote_scores_equal_in_process_scores(ocr_server, text_batch):
    images, prompts = text_batch
    local = OcrReward({"threads": 1})
    local.load(CPU)
    remote = RemoteReward({"url": ocr_server, "name": "ocr"})
    remote.load(CPU)
    expected = local.score(images, prompts)
    assert 0 < expected.mean() < 1
    np.testing.assert_array_equal(remote.score(images, prompts), expected)
    assert (remote.higher_is_better, remote.score_range, remote.groupwise, remote.world) == (True, (0.0, 1.0), False, "text")
    assert remote.prompts("eval")[:6] == prompts
    local.close()


def test_a_reward_failure_on_the_server_is_a_reward_error(ocr_server, text_batch):
    images, _ = text_batch
    remote = RemoteReward({"url": ocr_server})
    remote.load(CPU)
    with pytest.raises(RewardError, match=r"HTTP 422\): Prompt 'a plain prompt' has no quoted text"):
        remote.score(images[:1], [Prompt("a plain prompt")])
    for bad in ("not base64!", "aGVsbG8="):  # the second decodes, to bytes that are not a PNG
        body = json.dumps({"images": [bad], "prompts": [{"text": '"x"'}]}).encode()
        request = urllib.request.Request(ocr_server + "/score", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 400 and "Malformed" in json.loads(info.value.read())["error"]


def test_the_served_reward_must_be_the_one_named(ocr_server):
    with pytest.raises(RewardError, match="serves 'ocr', not 'compositional'"):
        RemoteReward({"url": ocr_server, "name": "compositional"}).load(CPU)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_is_a_clear_error_after_retries():
    url = f"http://127.0.0.1:{free_port()}"
    t = time.perf_counter()
    with pytest.raises(RewardError, match=rf"No reward server answered at {url} after 3 attempts .*serve-reward"):
        RemoteReward({"url": url, "retries": 2, "backoff": 0.1}).load(CPU)
    assert time.perf_counter() - t >= 0.3  # backoff 0.1 then 0.2


def test_a_server_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RewardError, match="after 2 attempts .*timed out"):
            RemoteReward({"url": url, "timeout": 0.3, "retries": 1, "backoff": 0}).load(CPU)


def test_module_entry_point_serves_and_stops_cleanly():
    proc, url = start_server([sys.executable, "-m", "dgpo_bench_rewards.server", "compositional"])
    try:
        remote = RemoteReward({"url": url, "name": "compositional"})
        remote.load(CPU)
        prompts = remote.prompts("eval")[:4]
        images = np.stack([render_scene(p.metadata["scene"], np.random.default_rng(i)) for i, p in enumerate(prompts)])
        np.testing.assert_array_equal(remote.score(images, prompts), np.ones(4))
    finally:
        assert stop_server(proc) == 0


def tiny_run(weights) -> list[str]:
    """One step of 4 images on the tiny nano checkpoint, 2-step samplers, 3 held-out prompts."""
    return ["--objective", "dgpo", "--steps", "1", "--group-size", "2", "--prompts-per-step", "2",
            "--eval-prompts", "3", "-o", f"nano.weights={weights}", "-o", "sampler.steps=2",
            "-o", "eval-sampler.steps=2", "-o", "dgpo.num_timesteps=1", "-o", "dgpo.trunc_steps=1"]


def test_runs_take_world_and_prompts_from_the_remote_rewards_server(ocr_server, tiny_weights, tmp_path, capsys):
    from dgpo_bench.cli import main

    remote = ["--reward", "remote", "-o", f"remote.url={ocr_server}", "-o", "remote.name=ocr"]
    assert main(["run", *remote, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["rewards"][0]["options"]["url"] == ocr_server

    tiny = tiny_run(tiny_weights)
    code = main(["run", *remote, *tiny, "--out", str(tmp_path / "run"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result["tuned"]) == {"remote"} and 0.0 <= result["tuned"]["remote"] <= 1.0
    shown = json.loads((tmp_path / "run" / "per_prompt.json").read_text())["prompts"]
    assert shown == [p.text for p in OcrReward().prompts("eval")[:3]]  # the server's held-out prompts
    assert "ships prompts" not in captured.err and result["steps"] == 1

    # the server's world is checked against the other rewards' once the remote reward is loaded
    config = tmp_path / "with-shapes.json"
    config.write_text(json.dumps({"eval": {"rewards": [{"name": "compositional"}]}}))
    code = main(["run", *remote, *tiny, "--config", str(config), "--out", str(tmp_path / "mixed")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "Evaluation reward 'compositional' scores the 'shapes' world but the run trains on 'text' prompts" in err


def test_a_remote_reward_without_prompts_runs_on_the_backbones(sharpness_plugin, tiny_weights, tmp_path, capsys):
    from dgpo_bench.cli import main

    proc, url = start_server([str(CLI), "serve-reward", "sharpness"])  # finds the plugin through the env
    try:
        code = main(["run", "--reward", "remote", "-o", f"remote.url={url}", *tiny_run(tiny_weights),
                     "--out", str(tmp_path / "run"), "--json"])
    finally:
        assert stop_server(proc) == 0
    captured = capsys.readouterr()
    assert code == 0, captured.err
    note = "no reward here ships prompts: using the default train and eval prompts of backbone 'nano'"
    assert note in " ".join(captured.err.split())  # known only once the server has answered
    assert json.loads((tmp_path / "run" / "result.json").read_text())["notes"][-1] == note
    assert 0.0 < json.loads(captured.out)["tuned"]["remote"] < 1.0
