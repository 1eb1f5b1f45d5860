"""Each objective's step diagnostics and the evaluations reach metrics.jsonl: a tiny real run per objective."""

import json
import math

import pytest
import torch

from test_suite import bench

pytestmark = pytest.mark.usefixtures("sharpness_plugin")

SPEC = """
backbone = {{ name = "nano", options = {{ weights = "{weights}", autocast = "off" }} }}
objective = {{ name = "{objective}", options = {options} }}
sampler = {{ name = "{sampler}", options = {{ steps = 3 }} }}
rewards = [{{ name = "ocr" }}, {{ name = "sharpness" }}]
group_size = 2
prompts_per_step = 2
[budget]
steps = 3
[eval]
sampler = {{ name = "ode-euler", options = {{ steps = 2 }} }}
prompts = 2
batch_size = 2
grid = 0
every = 1
"""

RUNS = {
    "dgpo": ("dpm-solver", "{ num_timesteps = 1, trunc_steps = 1, ema_rollout_after = 1 }",
             {"kl", "clip_frac", "group_weight_mean", "ratio_mean", "ratio_min", "ratio_max"}),
    "flow-grpo": ("flow-sde", "{}", {"kl", "clip_frac", "ratio_mean", "ratio_min", "ratio_max"}),
    "diffusion-dpo": ("dpm-solver", "{}", {"implicit_acc", "loss"}),
}


def train_records(tmp_path, capsys, weights, objective):
    sampler, options, _ = RUNS[objective]
    cfg = tmp_path / f"{objective}.toml"
    cfg.write_text(SPEC.format(weights=weights, objective=objective, options=options, sampler=sampler))
    code, _, err = bench(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / objective), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    # an evaluation every step, the last one made once, as the final one
    assert [(r["step"], r["label"]) for r in records if r["type"] == "eval"] == \
        [(0, "base"), (1, "step00001"), (2, "step00002"), (3, "final")]
    return [r for r in records if r["type"] == "train"]


@pytest.mark.parametrize("objective", sorted(RUNS))
def test_train_records_hold_the_objectives_diagnostics(tmp_path, capsys, tiny_weights, objective):
    records = train_records(tmp_path, capsys, tiny_weights, objective)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        m = r["metrics"]
        assert RUNS[objective][2] <= set(m), sorted(m)
        assert all(math.isfinite(v) for v in m.values()), m
        if objective == "dgpo":
            assert 0 < m["group_weight_mean"] < 1 and m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
        elif objective == "flow-grpo":  # one on-policy update per rollout
            assert m["ratio_min"] == m["ratio_max"] == 1.0 and m["clip_frac"] == 0.0
        else:
            assert 0 <= m["implicit_acc"] <= 1
    if objective == "dgpo":  # ema_rollout_after 1: steps 0 and 1 (0-based) roll out with the current weights
        assert [r["metrics"]["rollout_ema"] for r in records] == [0.0, 0.0, 1.0]


def test_flow_grpo_second_update_of_a_rollout_is_off_policy(tmp_path, capsys, tiny_weights):
    """updates_per_rollout = 2: each rollout of 2 groups x 2 is dealt at random into two updates;
    the first is on-policy (ratio exactly 1), the second re-scores the stored log-probs under
    weights one step newer, so its ratio leaves 1 and, with a large step, the 1e-4 clip acts."""
    cfg = tmp_path / "spec.toml"
    text = SPEC.format(weights=tiny_weights, objective="flow-grpo", options="{ lr = 1e-2 }", sampler="flow-sde")
    cfg.write_text(text.replace("prompts_per_step = 2\n", "prompts_per_step = 2\nupdates_per_rollout = 2\n"
                                "log_samples = true\n").replace("steps = 3\n[eval]", "steps = 4\n[eval]"))
    code, _, err = bench(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / "run"), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["cost"]["optimizer_steps"] for r in train] == [1, 2, 3, 4]
    assert [r["cost"]["images"] for r in train] == [4, 4, 8, 8]  # one rollout of 4 images per two updates
    for first, second in (train[0:2], train[2:4]):
        assert first["metrics"]["ratio_min"] == first["metrics"]["ratio_max"] == 1.0
        assert first["metrics"]["clip_frac"] == 0.0
        assert second["metrics"]["ratio_min"] < 1.0 or second["metrics"]["ratio_max"] > 1.0
        assert second["metrics"]["clip_frac"] > 0.0
    samples = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    for a, b in (samples[0:2], samples[2:4]):
        # the two updates share the rollout's samples: each group's two members, once each
        assert sorted(a["group_ids"] + b["group_ids"]) == [0, 0, 1, 1]
        # advantages are computed over all four rewards of the rollout (global std, as released)
        rewards = torch.tensor(a["rewards"] + b["rewards"], dtype=torch.float64)
        gids = torch.tensor(a["group_ids"] + b["group_ids"])
        means = torch.stack([rewards[gids == g].mean() for g in (0, 1)])[gids]
        want = ((rewards - means) / (rewards.std(unbiased=False) + 1e-4)).clamp(-5, 5)
        assert torch.allclose(torch.tensor(a["advantages"] + b["advantages"], dtype=torch.float64), want, atol=1e-5)
