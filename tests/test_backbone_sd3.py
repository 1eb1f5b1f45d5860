"""The sd3 backbone against a tiny random SD3.5-style pipeline built offline in a tmp folder."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil

import pytest
import torch

from dgpo_bench.cli import main
from dgpo_bench.context import EngineContext, make_accelerator
from dgpo_bench.contracts import LoadContext, Prompt, RolloutBatch
from dgpo_bench.errors import InvalidOptionsError, MissingWeightsError
from dgpo_bench.evaluation import evaluate
from dgpo_bench.plugins import get_plugin_manager, load_components
from dgpo_bench_backbones import plugin
from dgpo_bench_backbones.checkpoints import CorruptWeightsError
from dgpo_bench_backbones.sd3 import SD3Backbone
from dgpo_bench_backbones.tiny_sd3 import build_tiny_sd3
from dgpo_bench_objectives.dgpo import Dgpo
from dgpo_bench_samplers.ode import OdeEuler

CPU = LoadContext(device=torch.device("cpu"))
PROMPTS = ['a sign that says "cat"', "a red cube"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    build_tiny_sd3(path)
    return path


def load(folder, **opts):
    bb = SD3Backbone({"path": str(folder), "dtype": "fp32", "resolution": 32, "lora_rank": 4, "lora_alpha": 8,
                      **opts})
    bb.load(CPU)
    return bb


def pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(b=2, seed=3):
    return torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def euler(bb, cond, x, steps, guidance):
    """A plain Euler loop on the shifted sigma grid of the folder's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(bb.options.path, subfolder="scheduler")
    sched.set_timesteps(steps)
    sig = sched.sigmas
    for i in range(steps):
        x = x + (sig[i + 1] - sig[i]) * bb.velocity(x, sig[i], cond, guidance_scale=guidance)
    return x


def test_registered_with_defaults(folder, monkeypatch):
    comps = load_components(get_plugin_manager(load_entrypoints=False, plugins=[plugin]))
    assert comps.backbones.get("sd3") is SD3Backbone
    opts = SD3Backbone.Options()
    assert (opts.lora_rank, opts.lora_alpha, opts.dtype, opts.resolution) == (64, 128.0, "bf16", 512)
    monkeypatch.setenv("DGPO_BENCH_SD3_PATH", str(folder))
    bb = SD3Backbone({"dtype": "fp32", "lora_rank": 2})
    bb.load(CPU)
    assert bb.latent_shape == (4, 256, 256)  # 512 px through the tiny VAE's factor 2
    assert (bb.default_guidance_scale, bb.default_shift) == (4.5, 3.0)


def test_cfg_sampling_and_decode_match_the_diffusers_pipeline(folder):
    bb = load(folder)
    x0 = noise()
    with torch.no_grad():
        ours = euler(bb, bb.encode_prompts(PROMPTS), x0, steps=3, guidance=4.5)
        pipe = pipeline(folder)
        theirs = pipe(PROMPTS, latents=x0, num_inference_steps=3, guidance_scale=4.5, max_sequence_length=128,
                      height=32, width=32, output_type="latent").images
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        # the project's ode-euler sampler with the backbone's defaults (CFG 4.5, shift 3 from the folder)
        sampled = OdeEuler({"steps": 3}).sample(bb, bb.encode_prompts(PROMPTS), x0).latents
        torch.testing.assert_close(sampled, theirs, rtol=1e-4, atol=1e-4)
        pixels = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor)[0]
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    images = bb.decode(ours)
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"
    assert abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert bb.meter.nfe["policy"] == 2 * (3 * 2 * 2)


def dgpo_step(bb, lr=1e-2):
    """One real DGPO step (rollouts of 2 prompts x 2 with ode-euler, fixed rewards) through the engine context."""
    sampler = OdeEuler({"steps": 7})
    objective = Dgpo({"lr": lr, "micro_batch_size": 2})
    ctx = EngineContext(bb, sampler, make_accelerator(), objective.options, seed=0, group_size=2, num_groups=2)
    objective.setup(ctx)
    prompts = [Prompt(t) for t in PROMPTS for _ in range(2)]
    cond = bb.encode_prompts([p.text for p in prompts])
    x_T = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    out = sampler.sample(bb, cond, x_T)
    gids, rewards = torch.tensor([0, 0, 1, 1]), torch.tensor([0.2, 0.9, 0.5, 0.1])
    batch = RolloutBatch(prompts=prompts, cond=cond, noise=x_T, latents=out.latents, sigmas=out.sigmas,
                         group_ids=gids, rewards=rewards, guidance_scale=sampler.guidance(bb),
                         sample_ids=torch.arange(4), rollout_rewards=rewards, rollout_group_ids=gids)
    return ctx.update(objective, batch)


def test_dgpo_step_changes_lora_and_reference_stays_base(folder):
    bb = load(folder)
    cond = bb.encode_prompts(PROMPTS)
    x, s = noise(seed=7), torch.tensor([0.5, 0.9])
    with torch.no_grad():
        base = bb.velocity(x, s, cond)
    before = [p.detach().clone() for p in bb.trainable_parameters()]
    step = dgpo_step(bb)
    assert all(torch.isfinite(torch.tensor(v)) for v in step.metrics.values()) and step.metrics["grad_norm"] > 0
    changed = [not torch.equal(a, p) for a, p in zip(before, bb.trainable_parameters())]
    assert sum(changed) == len(changed) - 1  # all but the last block's unused context query (grad 0)
    assert all(p.dtype == torch.float32 for p in bb.trainable_parameters())
    with torch.no_grad():
        assert (bb.velocity(x, s, cond) - base).abs().max() > 1e-4
        with bb.reference():
            torch.testing.assert_close(bb.velocity(x, s, cond), base, rtol=0, atol=0)
    # rollout 4 x 7 CFG steps; DGPO: 4 timesteps x 4 samples of reference, fast EMA and grad policy (its
    # micro-batches of 2 hold whole groups of 2, so s_g needs no extra no-grad policy pass, as released)
    assert dict(bb.meter.nfe) == {"policy": 2 + 4 * 7 * 2 + 16 + 2, "reference": 16 + 2, "ema": 16}
    assert bb.meter.optimizer_steps == 1


def test_held_out_prompts_stay_encoded_while_training_prompts_cycle(folder, monkeypatch):
    from accelerate import Accelerator

    bb = load(folder, prompt_cache=2)
    calls = []
    encode = bb._encode_uncached
    monkeypatch.setattr(bb, "_encode_uncached", lambda texts: calls.append(texts) or encode(texts))
    held_out = [Prompt(f'a sign that says "{w}"') for w in ("one", "two", "three")]
    training = [[f'a sign that says "{r}{i}"' for i in range(3)] for r in "abc"]
    for texts in training:  # evaluation, then a rollout of more prompts than the LRU holds
        evaluate(bb, OdeEuler({"steps": 1}), {}, held_out, [0], 2, Accelerator(cpu=True))
        with bb.meter.phase("rollout"):
            bb.encode_prompts(texts)
    assert calls == [[p.text for p in held_out[:2]], [""], [held_out[2].text], *training]
    with bb.meter.phase("rollout"):
        bb.encode_prompts(training[0][:1])  # evicted from the LRU of 2
    assert calls[-1] == training[0][:1]


def test_gradient_checkpointing_gives_the_same_gradients(folder):
    grads = []
    for flag in (False, True):
        bb = load(folder, gradient_checkpointing=flag, lora_init="kaiming")
        bb.train()
        x, s = noise(seed=9), torch.tensor([0.4, 0.7])
        bb.velocity(x, s, bb.encode_prompts(PROMPTS)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.trainable_parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_exported_lora_loads_into_a_plain_pipeline_and_changes_it(folder, tmp_path):
    bb = load(folder)
    dgpo_step(bb)
    bb.save_trainable(tmp_path / "lora")
    x, s = noise(seed=11), torch.tensor([0.6, 0.6])
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        trained = bb.velocity(x, s, cond)
    pipe = pipeline(folder)
    call = dict(latents=noise(), num_inference_steps=2, guidance_scale=4.5, height=32, width=32, output_type="np")
    plain = pipe(PROMPTS, **call).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        v = pipe.transformer(hidden_states=x, timestep=s * 1000, encoder_hidden_states=cond.tensors[
            "encoder_hidden_states"], pooled_projections=cond.tensors["pooled_projections"], return_dict=False)[0]
    torch.testing.assert_close(v, trained, rtol=1e-5, atol=1e-5)
    assert abs(pipe(PROMPTS, **call).images - plain).max() > 1e-3


@pytest.mark.usefixtures("sharpness_plugin")
@pytest.mark.parametrize("objective, sampler, options", [
    ("dgpo", "dpm-solver", ["dgpo.num_timesteps=2", "dgpo.trunc_steps=2"]),
    ("flow-grpo", "flow-sde", ["flow-grpo.timestep_fraction=0.5"]),
])
def test_cli_run_trains_and_exports_the_lora_that_eval_and_diffusers_reload(folder, tmp_path, capsys, objective,
                                                                             sampler, options):
    from safetensors.torch import load_file

    sd3 = {"path": folder, "dtype": "fp32", "resolution": 32, "lora_rank": 4, "lora_alpha": 8}
    flags = [f"sd3.{k}={v}" for k, v in sd3.items()] + ["sampler.steps=3", "eval-sampler.steps=2",
                                                         f"{objective}.lr=1e-2", *options]
    run = tmp_path / "run"
    code = main(["run", "--backbone", "sd3", "--objective", objective, "--sampler", sampler,
                 "--reward", "ocr=1,sharpness=0.1", "--steps", "1", "--group-size", "2", "--prompts-per-step", "2",
                 "--eval-prompts", "2", *[a for f in flags for a in ("-o", f)], "--out", str(run), "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    result = json.loads(cap.out)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert len(train) == 1 and train[0]["reward_std"] > 0 and train[0]["cost"]["optimizer_steps"] == 1

    # the exported LoRA moved away from the seeded init (whose B factors are zero)
    init = load(folder)
    init.save_trainable(tmp_path / "init")
    before = load_file(str(tmp_path / "init" / "pytorch_lora_weights.safetensors"))
    after = load_file(str(run / "weights" / "pytorch_lora_weights.safetensors"))
    unchanged = {k for k in after if torch.equal(after[k], before[k])}
    # A and B of 8 projections in 2 blocks, less the last block's to_add_out (it has no context output)
    assert after.keys() == before.keys() and len(after) == 2 * 2 * len(init.options.lora_target_modules) - 2
    assert unchanged == {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"}  # unused, grad 0

    # 'eval RUN_DIR' rebuilds the sd3 backbone from the run's spec and reloads those weights
    assert main(["eval", str(run), "--prompts", "2", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == pytest.approx(result["tuned"], abs=1e-6)
    assert scores["sharpness"] != pytest.approx(result["base"]["sharpness"], abs=1e-9)

    # and a plain diffusers pipeline takes them
    pipe = pipeline(folder)
    x, s = noise(seed=13), torch.tensor([700.0, 300.0])
    cond = init.encode_prompts(PROMPTS).tensors
    call = dict(hidden_states=x, timestep=s, encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"], return_dict=False)
    with torch.no_grad():
        plain = pipe.transformer(**call)[0]
        pipe.load_lora_weights(str(run / "weights"))
        tuned = pipe.transformer(**call)[0]
    assert (tuned - plain).abs().max() > 1e-4


def test_missing_incomplete_and_corrupt_folders(folder, tmp_path, monkeypatch):
    monkeypatch.delenv("DGPO_BENCH_SD3_PATH", raising=False)
    with pytest.raises(MissingWeightsError, match="DGPO_BENCH_SD3_PATH"):
        SD3Backbone().load(CPU)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match="could not be loaded from the Hugging Face Hub"):
        load("nobody-here/no-such-model")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "text_encoder_3" / "model.safetensors").unlink()
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(MissingWeightsError, match=r"missing scheduler/, text_encoder_3 weights\)"):
        load(broken)
    shutil.copytree(folder / "scheduler", broken / "scheduler")
    shutil.copy(folder / "text_encoder_3" / "model.safetensors", broken / "text_encoder_3")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CorruptWeightsError, match="could not be loaded"):
        load(broken)
    with pytest.raises(InvalidOptionsError, match="not a multiple of 4"):
        load(folder, resolution=30)
