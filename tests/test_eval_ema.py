"""The evaluation EMA (eval.ema): exported weights are the slow EMA of the trained ones."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dgpo_bench.evaluation import EvalResult
from test_suite import bench

pytestmark = pytest.mark.usefixtures("sharpness_plugin")

SPEC = """
backbone = {{ name = "nano", options = {{ weights = "{weights}", autocast = "off" }} }}
objective = {{ name = "dgpo", options = {{ num_timesteps = 1, trunc_steps = 1, lr = 1e-2 }} }}
sampler = {{ name = "dpm-solver", options = {{ steps = 3 }} }}
rewards = [{{ name = "ocr" }}, {{ name = "sharpness" }}]
group_size = 2
prompts_per_step = 2
[budget]
steps = {steps}
[eval]
sampler = {{ name = "ode-euler", options = {{ steps = 2 }} }}
prompts = 2
batch_size = 2
grid = 0
{ema}
"""


def trained(tmp_path, capsys, weights, steps, ema=""):
    cfg = tmp_path / f"spec-{steps}-{bool(ema)}.toml"
    cfg.write_text(SPEC.format(weights=weights, steps=steps, ema=ema))
    out = tmp_path / cfg.stem
    code, _, err = bench(capsys, "run", "--config", str(cfg), "--out", str(out), "--json")
    assert code == 0, err
    return load_file(str(out / "weights" / "transformer" / "diffusion_pytorch_model.safetensors")), out


def test_exported_weights_are_the_warmed_up_slow_ema(tmp_path, capsys, tiny_weights):
    from dgpo_bench_backbones.nano.model import load_nano

    w0 = {k: v.float() for k, v in load_nano(tiny_weights).transformer.state_dict().items()}
    w1, _ = trained(tmp_path, capsys, tiny_weights, 1)
    w2, _ = trained(tmp_path, capsys, tiny_weights, 2)
    e2, run = trained(tmp_path, capsys, tiny_weights, 2, "ema = { decay = 0.5, every = 1 }")
    d1, d2 = min(0.5, 2 / 11), min(0.5, 3 / 12)  # warm-up decay (1 + k) / (10 + k) after steps 1 and 2
    moved = 0
    for k, v in e2.items():
        expect = d2 * (d1 * w0[k] + (1 - d1) * w1[k]) + (1 - d2) * w2[k]
        assert torch.allclose(v, expect, atol=1e-6), k
        moved += not torch.equal(w2[k], v)
    assert moved > 0  # the EMA is not simply the last weights
    spec = json.loads((run / "spec.resolved.json").read_text())
    assert spec["eval"]["ema"] == {"decay": 0.5, "every": 1}


def test_checkpoint_round_trips_the_ema(tmp_path, capsys, tiny_weights, sharpness_plugin):
    from dgpo_bench.engine import Engine

    _, run = trained(tmp_path, capsys, tiny_weights, 1, "ema = { decay = 0.5, every = 1 }")
    from dgpo_bench.plugins import get_plugin_manager, load_components
    from dgpo_bench.resolve import build_spec, resolve

    comps = load_components(get_plugin_manager(plugins_dirs=[sharpness_plugin]))
    data = json.loads((run / "spec.resolved.json").read_text())
    engines = []
    for i in range(2):
        spec, notes = build_spec(comps, data, [], source="test")
        e = Engine(resolve(comps, spec, notes), tmp_path / "ck", plugin_versions=comps.versions)
        e.prepare_dir()
        e.build()
        engines.append(e)
    a, b = engines
    for t in a.eval_ema.tensors:
        t.add_(1.0)
    a._save_checkpoint(1, EvalResult({"ocr": 0.0}, {"ocr": [0.0]}, None, []))
    b._load_checkpoint()
    assert all(torch.equal(x, y) for x, y in zip(a.eval_ema.tensors, b.eval_ema.tensors))
    assert not all(torch.equal(x, p.float()) for x, p in zip(b.eval_ema.tensors, b.backbone.trainable_parameters()))
