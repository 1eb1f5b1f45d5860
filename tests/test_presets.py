"""The published presets: what they pin, and that the user's flags still win over them."""

import json

import pytest

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
