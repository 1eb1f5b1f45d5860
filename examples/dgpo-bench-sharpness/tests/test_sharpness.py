import numpy as np

from dgpo_bench.contracts import Prompt
from dgpo_bench.testing import check_reward
from dgpo_bench_sharpness import Sharpness


def test_passes_the_reward_contract():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    check_reward(Sharpness, {}, images, [Prompt("a sign that says \"hi\"")] * 4)


def test_sharp_edges_score_higher_than_flat_grey():
    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    edges = flat.copy()
    edges[:, :, ::2] = 0
    reward = Sharpness()
    assert reward.score(flat, [Prompt("x")])[0] == 0.0
    assert reward.score(edges, [Prompt("x")])[0] > 0.9
