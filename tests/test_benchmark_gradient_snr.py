"""benchmarks/gradient_snr.py: gradients are captured without moving the weights, and a
step's gradient is a deterministic function of its index."""

import json

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def snr():
    return load_benchmark("gradient_snr")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_estimates_leave_the_weights_alone_and_repeat_per_step(snr):
    args = snr.argparse.Namespace(preset="dgpo-nano", reward="ocr", group_size=2, prompts_per_step=2, seed=0,
                                  option=["dgpo.num_timesteps=1"])
    engine = snr.build(args)
    before = [p.detach().clone() for p in engine.ctx.params]
    grads, rewards = snr.gradient_estimates(engine, [0, 1, 0])
    assert all(torch.equal(a, b) for a, b in zip(before, engine.ctx.params))
    assert len(grads) == 3 and len(rewards) == 3 and all(g.norm() > 0 for g in grads)
    assert grads[0].numel() == sum(p.numel() for p in before)
    assert snr.cosine(grads[0], grads[2]) == pytest.approx(1.0, abs=1e-5)  # same step: same draws
    assert snr.cosine(grads[0], grads[1]) < 0.99


def test_cli_prints_cosines_as_json(snr, capsys):
    snr.main(["--group-size", "4", "--prompts-per-step", "2", "--estimates", "3", "--threads", "1",
              "-o", "dgpo.num_timesteps=1", "--line-search", "1e-3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["objective"] == "dgpo" and out["images_per_step"] == 8
    assert len(out["cosines"]) == (3 - out["zero_gradients"]) * (2 - out["zero_gradients"]) // 2
    assert all(-1 <= c <= 1 for c in out["cosines"])
    assert out["mean_cosine"] == pytest.approx(sum(out["cosines"]) / len(out["cosines"]))
    ls = out["line_search"]
    assert ls["sizes"] == [0.0, 1e-3] and len(ls["mean_gradient"]) == len(ls["mean_gradient_sign"]) == len(ls["random"]) == 2
    assert ls["mean_gradient"][0] == ls["mean_gradient_sign"][0] == ls["random"][0]  # size 0: the base weights


@pytest.mark.parametrize("argv, words", [(["--preset", "nope"], "Unknown preset 'nope'"),
                                         (["-o", "dgpo.nope=1"], "has no option 'nope'"),
                                         (["--line-search", "abc"], "not a comma-separated list")])
def test_user_errors_end_in_one_line_and_exit_2(snr, capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        snr.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and ": error: " in err.strip().splitlines()[-1]
