"""The nano backbone against a randomly initialised NanoModel written to a tmp folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dgpo_bench.contracts import LoadContext
from dgpo_bench.errors import InvalidOptionsError, MissingWeightsError
from dgpo_bench.plugins import get_plugin_manager, load_components
from dgpo_bench_backbones import plugin
from dgpo_bench_backbones.checkpoints import CorruptWeightsError
from dgpo_bench_backbones.nano.backbone import NanoBackbone
from dgpo_bench_backbones.nano.model import NanoConfig, NanoModel, load_nano, save_nano

CPU = LoadContext(device=torch.device("cpu"))
PROMPTS = ['a sign that says "cat"', 'the word "dog"', ""]
TINY = dict(height=16, width=32, patch_size=4, num_layers=2, num_attention_heads=2, attention_head_dim=16,
            joint_attention_dim=32, pooled_projection_dim=32, text_max_len=12, guidance_scale=2.5, shift=1.5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = NanoModel(NanoConfig(**TINY))
    # a random init has zero-initialised output layers (adaLN-zero); give them weights
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("nano") / "weights"
    save_nano(model, path)
    return path


@pytest.fixture(scope="module")
def base(weights):
    """An independent copy of the checkpoint, called through NanoModel's own forward."""
    return load_nano(weights)


def make(weights, **opts):
    bb = NanoBackbone({"weights": str(weights), "autocast": "off", **opts})
    bb.load(CPU)
    return bb


def inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 32, generator=g), torch.rand(b, generator=g)


def perturb(bb, scale=0.05):
    torch.manual_seed(2)
    with torch.no_grad():
        for p in bb.trainable_parameters():
            p.add_(torch.randn_like(p) * scale)


@torch.no_grad()
def base_velocity(base, x, sig, prompts):
    ehs, pooled = base.encode(prompts)
    return base(x, sig, ehs, pooled)


def test_registered_and_reads_config(weights):
    comps = load_components(get_plugin_manager(load_entrypoints=False, plugins=[plugin]))
    assert comps.backbones.get("nano") is NanoBackbone
    bb = make(weights)
    assert bb.latent_shape == (3, 16, 32)
    assert (bb.default_guidance_scale, bb.default_shift) == (2.5, 1.5)


@pytest.mark.parametrize("rank", [0, 4])
def test_velocity_matches_model_forward(weights, base, rank):
    bb = make(weights, lora_rank=rank)
    x, sig = inputs()
    v = bb.velocity(x, sig, bb.encode_prompts(PROMPTS))
    assert v.shape == (3, 3, 16, 32) and v.dtype == torch.float32
    torch.testing.assert_close(v, base_velocity(base, x, sig, PROMPTS), rtol=1e-5, atol=1e-5)


def test_cfg_is_the_manual_combination(weights, base):
    bb = make(weights)
    x, sig = inputs()
    v = bb.velocity(x, sig, bb.encode_prompts(PROMPTS), guidance_scale=3.0)
    vc = base_velocity(base, x, sig, PROMPTS)
    vu = base_velocity(base, x, sig, [""] * 3)
    torch.testing.assert_close(v, vu + 3.0 * (vc - vu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 4])
def test_reference_gives_base_model_after_update(weights, base, rank):
    bb = make(weights, lora_rank=rank, lora_alpha=8)
    x, sig = inputs()
    cond = bb.encode_prompts(PROMPTS)
    expected = base_velocity(base, x, sig, PROMPTS)
    perturb(bb)
    policy = bb.velocity(x, sig, cond)
    assert (policy - expected).abs().max() > 1e-3
    with torch.no_grad(), bb.reference():
        with bb.reference():  # nesting keeps the base weights
            torch.testing.assert_close(bb.velocity(x, sig, cond), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bb.velocity(x, sig, cond), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.velocity(x, sig, cond), policy)
    # after the reference pass the trainable weights still train, and only they do
    assert all(p.requires_grad for p in bb.trainable_parameters())
    bb.velocity(x, sig, cond).square().mean().backward()
    names = {id(p): n for n, p in bb.transformer.named_parameters()}
    no_grad = {names[id(p)] for p in bb.trainable_parameters() if p.grad is None or not p.grad.abs().sum()}
    # only the last block's context query is unused (that block drops its context output)
    assert no_grad and all(n.startswith("transformer_blocks.1.attn.add_q_proj.") for n in no_grad)
    assert all(p.grad is None for p in bb.model.text_encoder.parameters())
    n_train = sum(p.numel() for p in bb.trainable_parameters())
    if rank:  # rank-4 adapters on the 8 attention projections of 2 blocks (the last has no context out)
        assert n_train == sum(4 * (32 + 32) for _ in range(15))
    else:
        assert n_train == sum(p.numel() for p in base.transformer.parameters())


@pytest.mark.parametrize("rank", [0, 4])
def test_swapped_weights_restore(weights, rank):
    bb = make(weights, lora_rank=rank)
    perturb(bb)
    x, sig = inputs()
    cond = bb.encode_prompts(PROMPTS)
    before = bb.velocity(x, sig, cond)
    saved = [p.detach().clone() for p in bb.trainable_parameters()]
    other = [p.detach() + 0.05 * torch.randn_like(p) for p in bb.trainable_parameters()]
    with bb.swapped_weights(other):
        assert all(torch.equal(p, o) for p, o in zip(bb.trainable_parameters(), other))
        assert (bb.velocity(x, sig, cond) - before).abs().max() > 1e-3
    assert bb.meter.nfe["ema"] == 3
    assert all(torch.equal(p, s) for p, s in zip(bb.trainable_parameters(), saved))
    torch.testing.assert_close(bb.velocity(x, sig, cond), before, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 4])
def test_save_load_round_trip(weights, tmp_path, rank):
    bb = make(weights, lora_rank=rank, lora_alpha=8)
    perturb(bb)
    x, sig = inputs()
    trained = bb.velocity(x, sig, bb.encode_prompts(PROMPTS))
    bb.save_trainable(tmp_path)
    fresh = make(weights, lora_rank=rank, lora_alpha=8)
    fresh.load_trainable(tmp_path)
    torch.testing.assert_close(fresh.velocity(x, sig, fresh.encode_prompts(PROMPTS)), trained, rtol=0, atol=0)


def test_lora_file_loads_into_plain_diffusers_transformer(weights, tmp_path):
    bb = make(weights, lora_rank=4, lora_alpha=8)
    perturb(bb)
    x, sig = inputs()
    trained = bb.velocity(x, sig, bb.encode_prompts(PROMPTS))
    bb.save_trainable(tmp_path)
    plain = load_nano(weights)
    plain.transformer.load_lora_adapter(str(tmp_path), prefix="transformer",
                                       weight_name="pytorch_lora_weights.safetensors")  # alpha comes from the metadata
    torch.testing.assert_close(base_velocity(plain, x, sig, PROMPTS), trained, rtol=1e-5, atol=1e-5)


def test_lora_of_another_rank_is_refused(weights, tmp_path):
    make(weights, lora_rank=4).save_trainable(tmp_path)
    with pytest.raises(CorruptWeightsError, match="lora_rank"):
        make(weights, lora_rank=2).load_trainable(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"missing pytorch_lora_weights\.safetensors"):
        make(weights, lora_rank=2).load_trainable(tmp_path / "empty")


def test_meter_counts_nfes_by_role(weights):
    bb = make(weights, lora_rank=4)
    x, sig = inputs()
    cond = bb.encode_prompts(PROMPTS)
    bb.velocity(x, sig, cond, guidance_scale=2.0)
    with torch.no_grad(), bb.reference():
        bb.velocity(x, sig, cond)
    with bb.meter.phase("eval"):
        bb.velocity(x, sig, cond, guidance_scale=2.0)
    assert dict(bb.meter.nfe) == {"policy": 6, "reference": 3}
    assert bb.meter.eval_nfe == 6


def test_prompt_cache(weights, base):
    bb = make(weights, prompt_cache=2)
    cond = bb.encode_prompts(["ab", "cd", "ab"])
    ehs, pooled = base.encode(["ab", "cd", "ab"])
    torch.testing.assert_close(cond.tensors["encoder_hidden_states"], ehs)
    torch.testing.assert_close(cond.tensors["pooled_projections"], pooled)
    bb.encode_prompts(["ab", "ef"])  # "cd" is the least recently used
    assert list(bb._cache) == ["ab", "ef"]
    assert not cond.tensors["pooled_projections"].requires_grad


def test_decode(weights):
    bb = make(weights)
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    img = bb.decode(x)
    assert img.shape == (2, 1, 5, 3) and img.dtype.name == "uint8"
    assert img[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255]


def test_missing_and_corrupt_weights(weights, tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        make(tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text((weights / "config.json").read_text())
    with pytest.raises(MissingWeightsError, match=r"missing model\.safetensors"):
        make(tmp_path / "partial")
    (tmp_path / "partial" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptWeightsError, match="could not be loaded"):
        make(tmp_path / "partial")
    with pytest.raises(InvalidOptionsError, match="lora_target_modules"):
        make(weights, lora_rank=2, lora_target_modules=["no_such_layer"])


def test_trained_weights_of_another_model_name_the_tensor_that_does_not_fit(tmp_path):
    shapes = NanoBackbone({"world": "shapes", "autocast": "off"})
    shapes.load(CPU)
    shapes.save_trainable(tmp_path)  # full fine-tuning: the whole 64x64 transformer
    text = NanoBackbone({"world": "text", "autocast": "off"})
    text.load(CPU)
    with pytest.raises(CorruptWeightsError, match=r"does not fit this backbone \(size mismatch for pos_embed"):
        text.load_trainable(tmp_path)


def test_lora_init_depends_only_on_the_run_seed(weights):
    def init(seed):
        bb = NanoBackbone({"weights": str(weights), "lora_rank": 4, "autocast": "off"})
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        bb.load(LoadContext(device=torch.device("cpu"), seed=seed))
        return torch.cat([p.detach().flatten() for p in bb.trainable_parameters()])

    a, b, c = init(0), init(0), init(1)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.abs().sum() > 0


def test_auto_world_without_shipped_weights_is_explained():
    with pytest.raises(MissingWeightsError, match="ships weights for the worlds text and shapes, not 'geneval'"):
        NanoBackbone().load(LoadContext(device=torch.device("cpu"), world="geneval"))


def test_backbone_classes_pass_the_contract_checks():
    from dgpo_bench.testing import check_component_class, check_light_import
    from dgpo_bench_backbones.sd3 import SD3Backbone

    for cls in (NanoBackbone, SD3Backbone):
        check_component_class(cls)
    check_light_import(NanoBackbone, SD3Backbone)
