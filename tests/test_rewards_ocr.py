"""The ocr reward: a real rapidocr engine, Flow-GRPO's score, worker pool, failures."""

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch

from dgpo_bench.contracts import LoadContext, Prompt
from dgpo_bench.errors import RewardError
from dgpo_bench_rewards.ocr import OcrReward, ocr_target
from dgpo_bench_tasks.text import render_text

CPU = LoadContext(device=torch.device("cpu"))


def reference_levenshtein(a: str, b: str) -> int:
    """Plain dynamic programming over the full table."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def reference_score(recognised: str, target: str) -> float:
    """As the DGPO and Flow-GRPO releases score OCR: lower-case, drop spaces; 1 for a substring, else max(0, 1 - lev / len)."""
    r, t = recognised.lower().replace(" ", ""), target.lower().replace(" ", "")
    return 1.0 if t in r else max(0.0, 1.0 - reference_levenshtein(r, t) / len(t))


@pytest.fixture(scope="module")
def reward():
    r = OcrReward({"workers": 0})
    r.load(CPU)
    yield r
    r.close()


def test_target_is_the_quoted_text_else_metadata():
    assert ocr_target(Prompt('a sign that says "Hello World" in red')) == "Hello World"
    assert ocr_target(Prompt("a sign", {"target": "cargo"})) == "cargo"
    with pytest.raises(RewardError, match="no quoted text"):
        ocr_target(Prompt("a sign with nothing quoted"))


def test_ground_truth_renders_are_read_exactly(reward):
    prompts = reward.prompts("eval")[:16]
    rng = np.random.default_rng(0)
    images = np.stack([render_text(p.metadata["target"], rng) for p in prompts])
    texts = reward.read(images)
    assert [t.lower().replace(" ", "") for t in texts] == [p.metadata["target"].replace(" ", "") for p in prompts]
    assert np.array_equal(reward.score(images, prompts), np.ones(16))


def test_scores_follow_the_flow_grpo_formula_on_what_the_engine_reads(reward):
    # shown word vs prompt target: wrong letters, a substring hit, an empty image, a longer misspelling
    cases = [("cart", "cargo"), ("import", "port"), (None, "delay"), ("sytsem", "system"), ("zq", "length")]
    images = np.stack([render_text(shown) if shown else np.full((32, 128, 3), 255, np.uint8) for shown, _ in cases])
    prompts = [Prompt(f'a sign that says "{target}"') for _, target in cases]
    scores = reward.score(images, prompts)
    texts = reward.read(images)
    assert texts[0].lower() == "cart" and texts[2] == ""
    expected = [reference_score(t, target) for t, (_, target) in zip(texts, cases)]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores[:4], [1 - 2 / 5, 1.0, 0.0, 1 - 2 / 6], atol=1e-12)


def test_large_images_use_detection_and_read_the_text(reward):
    rng = np.random.default_rng(1)
    words = ["direct delay", "copyfile"]
    images = np.stack([render_text(w, rng, 512, 512, font_size=48) for w in words])
    assert reward.mode_for(512, 512) == "det-rec" and reward.mode_for(32, 128) == "rec"
    default = OcrReward()  # by default small crops are read in-process and large images by a pool
    assert (default.workers_for("rec"), default.workers_for("det-rec")) == (0, min(2, os.cpu_count()))
    scores = reward.score(images, [Prompt('a banner that reads "direct delay"'), Prompt('a label reading "copy"')])
    np.testing.assert_array_equal(scores, [1.0, 1.0])
    scores = reward.score(images[1:], [Prompt('a label reading "copyright"')])
    assert scores[0] == pytest.approx(reference_score("copyfile", "copyright"))


def test_engine_failures_and_bad_batches_raise_reward_error(reward):
    with pytest.raises(RewardError, match="OCR engine failed"):
        reward.score(np.zeros((1, 0, 128, 3), np.uint8), [Prompt('"x"')])  # rapidocr divides by the height
    with pytest.raises(RewardError, match=r"uint8 images of shape \(B, H, W, 3\)"):
        reward.score(np.zeros((2, 32, 128), np.uint8), [Prompt('"x"')] * 2)
    with pytest.raises(RewardError, match="2 images but 1 prompts"):
        reward.score(np.zeros((2, 32, 128, 3), np.uint8), [Prompt('"x"')])


def test_worker_pool_matches_in_process_and_a_dead_worker_is_an_error(reward):
    prompts = reward.prompts("eval")[16:28]
    rng = np.random.default_rng(2)
    images = np.stack([render_text(p.metadata["target"] if i % 3 else "noise", rng) for i, p in enumerate(prompts)])
    before = {p.pid for p in multiprocessing.active_children()}
    pooled = OcrReward({"workers": 2})
    pooled.load(CPU)
    try:
        workers = [p for p in multiprocessing.active_children() if p.pid not in before]
        assert len(workers) == 2
        np.testing.assert_array_equal(pooled.score(images, prompts), reward.score(images, prompts))
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].join(10)
        with pytest.raises(RewardError, match="worker process died"):
            pooled.score(images, prompts)
    finally:
        pooled.close()
    assert not any(p.is_alive() for p in workers)
