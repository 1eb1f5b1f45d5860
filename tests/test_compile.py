"""torch.compile of MM-DiT backbones (``-o nano.compile=on``; nano's 'auto' where bf16 is native): the compiled denoiser gives
eager's velocities and gradients, its warm-up is charged to the 'compile' phase, and without a C++
compiler the run warns in one line and stays eager. The rest of the suite runs with TorchDynamo
disabled (tests/conftest.py); these tests turn it back on."""

import warnings

import pytest
import torch

from dgpo_bench.contracts import LoadContext
from dgpo_bench.meters import CostMeter
from dgpo_bench_backbones.nano.backbone import NanoBackbone

CPU = LoadContext(device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def dynamo_on(monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # read when torch.compile is called
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def backbone(weights, compile_mode, **opts):
    bb = NanoBackbone({"weights": str(weights), "autocast": "off", "compile": compile_mode, **opts})
    bb.load(CPU)
    bb.meter = CostMeter()
    return bb


def test_compiled_denoiser_matches_eager_and_its_warmup_is_charged_to_compile(tiny_weights):
    eager, compiled = backbone(tiny_weights, "off"), backbone(tiny_weights, "on")
    x = torch.randn(4, *eager.latent_shape, generator=torch.Generator().manual_seed(0))
    texts = ['a sign that says "cat"', 'the word "dog"', "cat", ""]
    conds = {id(bb): bb.encode_prompts(texts) for bb in (eager, compiled)}

    def v(bb, sigma=0.5):
        return bb.velocity(x, torch.tensor(sigma), conds[id(bb)])

    def close(a, b):
        return torch.allclose(a, b, atol=1e-4, rtol=1e-4)

    with torch.no_grad():  # one batch shape throughout: each new one costs a compile
        with compiled.meter.phase("rollout"):
            assert close(v(compiled), v(eager))
        assert close(v(compiled, 0.2), v(eager, 0.2)) and not close(v(compiled, 0.2), v(compiled))
        with compiled.reference(), eager.reference():  # the frozen copy of full fine-tuning, compiled too
            assert close(v(compiled), v(eager))
        other = [p.detach() * 0.9 for p in eager.trainable_parameters()]  # weights lent for a pass (EMA)
        with compiled.swapped_weights(other), eager.swapped_weights(other):
            assert close(v(compiled), v(eager)) and not close(v(compiled), v(eager, 0.2))
    grads = []
    for bb in (compiled, eager):
        bb.train(True)
        with bb.meter.phase("train"):
            v(bb).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.trainable_parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape and torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)
    seconds = compiled.meter.snapshot()["seconds"]
    assert seconds["compile"] > 1.0  # the inference graph, then the training graph's forward and backward
    assert compiled.meter.train_seconds == pytest.approx(seconds["rollout"] + seconds["train"], abs=1e-3)
    assert compiled.transformer._compiled_call_impl is not None and eager.transformer._compiled_call_impl is None


def test_without_a_cpp_compiler_it_warns_in_one_line_and_runs_eager(tiny_weights):
    from torch._inductor import config

    bb = backbone(tiny_weights, "on")
    x = torch.randn(2, *bb.latent_shape)
    with config.patch({"cpp.cxx": (None, "no-such-g++")}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            bb.velocity(x, 0.5, bb.encode_prompts(["a", "b"]))
    messages = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert messages == ["nano.compile needs a C++ compiler (g++), which is not installed; running eager."]
    assert bb.transformer._compiled_call_impl is None and bb.meter.snapshot()["seconds"]["compile"] == 0
