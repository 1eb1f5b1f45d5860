"""The published presets: what they pin, and that the user's flags still win over them."""

import json

import pytest
import torch

from dgpo_bench.resolve import build_spec, resolve
from dgpo_bench_objectives.presets import PUBLISHED

TASK_REWARD = {"ocr": ("ocr", {}), "pickscore": ("pickscore", {}),
               "geneval": ("remote", {"url": "http://127.0.0.1:8765", "name": "geneval"})}
"""GenEval on SD3.5-M is a served reward, as in benchmarks/geneval-sd35m.toml."""


def resolved(components, name):
    # prompt files are named so that rewards without a prompt set resolve; nothing is read
    spec, notes = build_spec(components, {"preset": name, "prompts": {"train": "t.txt", "eval": "e.txt"}})
    return resolve(components, spec, notes)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_published_preset_alone_trains_sd3_on_its_task(components, name):
    r = resolved(components, name)
    reward, options = TASK_REWARD[name.rsplit("-", 1)[1]]
    assert r.backbone[0].name == "sd3"
    assert [cls.name for cls, _, _ in r.rewards] == [reward]
    assert r.rewards[0][1].model_dump().items() >= options.items()


def test_cli_flags_replace_a_published_presets_backbone_reward_and_options(capsys):
    from dgpo_bench.cli import main

    code = main(["run", "--preset", "dgpo-geneval", "--backbone", "nano", "--reward", "compositional",
                 "-o", "dgpo.beta_kl=0.5", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    spec = json.loads(out[out.index("{"):])
    assert spec["backbone"]["name"] == "nano"
    assert spec["backbone"]["options"]["lora_rank"] == 0  # the preset's LoRA went with its backbone
    assert [r["name"] for r in spec["rewards"]] == ["compositional"]
    assert spec["objective"]["options"]["beta_kl"] == 0.5
    assert spec["objective"]["options"]["trunc_steps"] == 4  # the rest of the preset still applies


# --------------------------------------------------------------------------- published values

# The DGPO paper's table and released configs: beta_dpo, beta_kl, clip, G, trunc_steps, global std, switch
DGPO = {"dgpo-ocr": (100.0, 0.02, 1e-2, 16, 6, True, 200),
        "dgpo-geneval": (100.0, 0.02, 1e-2, 16, 4, False, 500),
        "dgpo-pickscore": (10.0, 0.001, 5e-2, 24, 6, True, 200)}
FLOW_GRPO_BETA = {"flow-grpo-ocr": 0.04, "flow-grpo-geneval": 0.04, "flow-grpo-pickscore": 0.01}
DPO = ("diffusion-dpo-ocr", "diffusion-dpo-geneval", "diffusion-dpo-pickscore")
OPTIMIZER = {"lr": 3e-4, "weight_decay": 1e-4, "grad_clip": 1.0, "betas": (0.9, 0.999)}
SD3_ROLLOUT = {"steps": 10, "guidance_scale": 4.5, "shift": 3.0}
DGPO_GRID = [0.9997, 0.964, 0.923, 0.875, 0.818, 0.750, 0.666, 0.562, 0.428, 0.250, 0.0]
"""The released 10-step rollout grid (DPM-Solver++ 2M, shift 3)."""


def check_shared(r, sampler, lora):
    """AdamW settings, rollout sampler, LoRA rank / alpha and the slow evaluation EMA (0.9 every 8)."""
    assert {k: getattr(r.objective[1], k) for k in OPTIMIZER} == OPTIMIZER
    assert r.sampler[0].name == sampler
    assert {k: getattr(r.sampler[1], k) for k in SD3_ROLLOUT} == SD3_ROLLOUT
    assert (r.backbone[1].lora_rank, r.backbone[1].lora_alpha) == lora
    assert r.spec.eval.ema.model_dump() == {"decay": 0.9, "every": 8}


def test_every_published_preset_is_pinned_here():
    assert set(PUBLISHED) == set(DGPO) | set(FLOW_GRPO_BETA) | set(DPO)


@pytest.mark.parametrize("name", sorted(DGPO))
def test_dgpo_presets(components, name):
    beta_dpo, beta_kl, clip, group_size, trunc, global_std, switch = DGPO[name]
    r = resolved(components, name)
    o = r.objective[1]
    assert (o.beta_dpo, o.beta_kl, o.clip_range, o.trunc_steps, o.global_std, o.ema_rollout_after) == \
        (beta_dpo, beta_kl, clip, trunc, global_std, switch)
    assert (o.num_timesteps, o.timestep_sampling, o.adv_clip, o.trust_region, o.loss_form, o.reference) == \
        (4, "grid", 5.0, True, "released", "base")
    assert (r.spec.group_size, r.spec.prompts_per_step) == (group_size, 8)
    check_shared(r, "dpm-solver", (64, 128))
    sched = r.sampler[0](r.sampler[1]).make_scheduler(r.sampler[1].shift)
    sched.set_timesteps(r.sampler[1].steps)
    assert torch.allclose(sched.sigmas.float(), torch.tensor(DGPO_GRID), atol=5e-4)
    # the lowest trained sigma: 0.666 on OCR and PickScore, 0.818 on GenEval
    assert sched.sigmas[o.trunc_steps].item() == pytest.approx(0.818 if "geneval" in name else 0.666, abs=5e-4)


@pytest.mark.parametrize("name", sorted(FLOW_GRPO_BETA))
def test_flow_grpo_presets(components, name):
    r = resolved(components, name)
    o = r.objective[1]
    assert (o.beta_kl, o.clip_range, o.timestep_fraction, o.global_std, o.adv_clip) == \
        (FLOW_GRPO_BETA[name], 1e-4, 0.99, True, 5.0)
    # G 24; 48 groups per rollout, dealt into two optimizer steps (the second off-policy), as released
    assert (r.spec.group_size, r.spec.prompts_per_step, r.spec.updates_per_rollout) == (24, 48, 2)
    check_shared(r, "flow-sde", (32, 64))
    assert (r.sampler[1].noise_level, r.sampler[1].sde_window) == (0.7, None)
    # trained: the stochastic steps k < int(T * timestep_fraction), i.e. 0..8 of 10
    stochastic = r.sampler[0](r.sampler[1]).stochastic_steps(r.sampler[1].steps)
    assert [k for k in stochastic if k < int(r.sampler[1].steps * o.timestep_fraction)] == list(range(9))


@pytest.mark.parametrize("name", DPO)
def test_diffusion_dpo_presets(components, name):
    r = resolved(components, name)
    assert r.objective[1].beta == 100.0
    assert (r.spec.group_size, r.spec.prompts_per_step) == (16, 8)  # DGPO's rollouts
    check_shared(r, "dpm-solver", (64, 128))
