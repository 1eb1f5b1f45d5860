"""Presets: the published settings of each objective (SD3.5-Medium) and nano-scale starting points.

Published values follow the papers and the authors' released configs: DGPO (LoRA r 64 /
alpha 128, DPM-Solver++ 10 steps, CFG 4.5, shift 3, 8 groups per step), Flow-GRPO (LoRA r 32
/ alpha 64, SDE 10 steps, noise 0.7, G 24, the global std on all three tasks), online
Diffusion-DPO as DGPO's baseline (beta 100, lr 3e-4, LoRA, DGPO's rollouts). Each also
names its backbone (sd3, with the method's LoRA) and its task's training reward, so
``--preset dgpo-geneval`` alone trains SD3.5-M on GenEval; ``--backbone`` or ``--reward``
still replace them. The nano presets start from the nano model's pretraining notes (full fine-tuning, lr 1e-4,
beta_dpo scaled up for pixel-space losses) and are meant to be swept.

Flow-GRPO's update schedule is the release's: 48 groups of 24 per rollout, advantages over
all 1152 rewards, the samples dealt at random into two optimizer steps of 576
(``updates_per_rollout = 2``), the second re-scoring the log-probs stored at rollout, so its
ratio differs from 1 and the 1e-4 clip acts. Budgets count optimizer steps.
"""

from __future__ import annotations

from typing import Any

SD3_SAMPLING = {"steps": 10, "guidance_scale": 4.5, "shift": 3.0}
OPTIMIZER = {"lr": 3e-4, "weight_decay": 1e-4, "grad_clip": 1.0}
EVAL_EMA = {"decay": 0.9, "every": 8}
"""Both released codebases evaluate and export a slow EMA of the LoRA weights."""


TASK_REWARDS: dict[str, list[dict[str, Any]]] = {
    "ocr": [{"name": "ocr"}],
    "geneval": [{"name": "remote", "options": {"url": "http://127.0.0.1:8765", "name": "geneval"}}],
    "pickscore": [{"name": "pickscore"}],
}
"""Each published task's training reward. GenEval's detector is served ('dgpo-bench serve-reward
geneval' from a plugin that provides it), as in benchmarks/geneval-sd35m.toml."""


def _preset(objective: str, objective_options: dict[str, Any], sampler: str, sampler_options: dict[str, Any],
            group_size: int, prompts_per_step: int, updates_per_rollout: int = 1) -> dict[str, Any]:
    return {
        "objective": {"name": objective, "options": objective_options},
        "sampler": {"name": sampler, "options": sampler_options},
        "group_size": group_size,
        "prompts_per_step": prompts_per_step,
        "updates_per_rollout": updates_per_rollout,
    }


def _published(task: str, method: dict[str, Any], lora_rank: int, lora_alpha: int) -> dict[str, Any]:
    """A method's settings on SD3.5-M with LoRA, the task's reward and the slow evaluation EMA.
    A backbone or rewards the user names replace these (the LoRA options go with the backbone)."""
    return {**method, "backbone": {"name": "sd3", "options": {"lora_rank": lora_rank, "lora_alpha": lora_alpha}},
            "rewards": TASK_REWARDS[task], "eval": {"ema": EVAL_EMA}}


def _dgpo(task: str, beta_dpo: float, beta_kl: float, clip: float, trunc: int, global_std: bool, switch: int,
          group_size: int) -> dict[str, Any]:
    opts = {**OPTIMIZER, "beta_dpo": beta_dpo, "beta_kl": beta_kl, "clip_range": clip, "trunc_steps": trunc,
            "num_timesteps": 4, "global_std": global_std, "ema_rollout_after": switch}
    return _published(task, _preset("dgpo", opts, "dpm-solver", SD3_SAMPLING, group_size, 8), 64, 128)


def _flow_grpo(task: str, beta_kl: float) -> dict[str, Any]:
    opts = {**OPTIMIZER, "beta_kl": beta_kl, "clip_range": 1e-4, "timestep_fraction": 0.99, "global_std": True}
    return _published(task, _preset("flow-grpo", opts, "flow-sde", {**SD3_SAMPLING, "noise_level": 0.7}, 24, 48, 2),
                      32, 64)


def _dpo(task: str) -> dict[str, Any]:
    return _published(task, _preset("diffusion-dpo", {**OPTIMIZER, "beta": 100.0}, "dpm-solver", SD3_SAMPLING, 16, 8),
                      64, 128)


PUBLISHED: dict[str, tuple[dict[str, Any], str]] = {
    "dgpo-ocr": (_dgpo("ocr", 100.0, 0.02, 1e-2, 6, True, 200, 16), "DGPO on OCR as released (SD3.5-M, LoRA 64)"),
    "dgpo-geneval": (_dgpo("geneval", 100.0, 0.02, 1e-2, 4, False, 500, 16),
                     "DGPO on GenEval as released (SD3.5-M, served geneval reward, trunc_steps 4, per-group std, "
                     "EMA rollouts after 500 steps)"),
    "dgpo-pickscore": (_dgpo("pickscore", 10.0, 0.001, 5e-2, 6, True, 200, 24),
                       "DGPO on PickScore (SD3.5-M, beta_dpo 10, G 24)"),
    "flow-grpo-ocr": (_flow_grpo("ocr", 0.04), "Flow-GRPO on OCR as released (SD3.5-M, LoRA 32, G 24)"),
    "flow-grpo-geneval": (_flow_grpo("geneval", 0.04),
                          "Flow-GRPO on GenEval as released (SD3.5-M, served geneval reward, beta 0.04, G 24)"),
    "flow-grpo-pickscore": (_flow_grpo("pickscore", 0.01),
                            "Flow-GRPO on PickScore as released (SD3.5-M, beta 0.01, G 24)"),
    "diffusion-dpo-ocr": (_dpo("ocr"), "online Diffusion-DPO baseline on OCR (SD3.5-M, beta 100, lr 3e-4, LoRA)"),
    "diffusion-dpo-geneval": (_dpo("geneval"), "online Diffusion-DPO baseline on GenEval (SD3.5-M, served geneval "
                                               "reward, beta 100, lr 3e-4, LoRA)"),
    "diffusion-dpo-pickscore": (_dpo("pickscore"),
                                "online Diffusion-DPO baseline on PickScore (SD3.5-M, beta 100, lr 3e-4, LoRA)"),
}

NANO_OPTIMIZER = {"lr": 1e-4, "weight_decay": 0.0, "grad_clip": 1.0}
NANO_BATCH = (16, 8)
"""Group size and groups per step on nano: DGPO's published 16 x 8. At 32 images per step the
step gradient was mostly noise (benchmarks/results/nano-sweeps.md); 128 images gave the first
held-out OCR gain."""
NANO: dict[str, tuple[dict[str, Any], str]] = {
    "dgpo-nano": (
        _preset("dgpo", {**NANO_OPTIMIZER, "beta_dpo": 1000.0, "beta_kl": 0.02, "clip_range": 1e-2,
                         "trunc_steps": 6, "num_timesteps": 4, "global_std": True, "ema_rollout_after": 50},
                "dpm-solver", {"steps": 10}, *NANO_BATCH),
        "DGPO on the nano backbone (full fine-tuning; beta_dpo for pixel-space losses)"),
    "flow-grpo-nano": (
        _preset("flow-grpo", {**NANO_OPTIMIZER, "beta_kl": 0.04, "clip_range": 1e-4, "global_std": True},
                "flow-sde", {"steps": 10, "noise_level": 0.7}, *NANO_BATCH),
        "Flow-GRPO on the nano backbone (full fine-tuning, SDE 10 steps)"),
    "diffusion-dpo-nano": (
        _preset("diffusion-dpo", {**NANO_OPTIMIZER, "beta": 1000.0}, "dpm-solver", {"steps": 10}, *NANO_BATCH),
        "online Diffusion-DPO on the nano backbone (full fine-tuning)"),
}
