"""Nano model: shapes of encode/forward, CFG null prompt, save/load round trip, sampler."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import torch

from dgpo_bench_backbones.nano.model import (NanoConfig, NanoModel, default_weights_dir, generate,
                                             load_nano, save_nano, tokenize)

TINY = dict(height=16, width=32, patch_size=4, num_layers=2, num_attention_heads=2, attention_head_dim=16,
            joint_attention_dim=32, pooled_projection_dim=32, text_max_len=24)


def _model():
    torch.manual_seed(0)
    m = NanoModel(NanoConfig(**TINY))
    with torch.no_grad():  # adaLN-zero output layers: give them weights
        for p in m.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def test_tokenize_and_encode_shapes():
    ids, mask = tokenize(['a sign that says "cargo"', ""], 24)
    assert ids.shape == (2, 24) and mask[1].sum() == 1  # "" is bos only
    m = _model()
    ehs, pooled = m.encode(['a sign that says "cargo"', ""])
    assert ehs.shape == (2, 24, 32) and pooled.shape == (2, 32)


def test_forward_shapes_and_full_finetune_grad():
    m = _model().train()
    x = torch.randn(3, 3, 16, 32)
    ehs, pooled = m.encode(["a", "b", ""])
    v = m(x, torch.rand(3), ehs, pooled)
    assert v.shape == x.shape
    v.pow(2).mean().backward()
    assert m.text_encoder.tok.weight.grad is not None
    assert all(p.grad is not None for p in m.transformer.parameters() if p.requires_grad)


def test_save_load_round_trip(tmp_path):
    m = _model()
    save_nano(m, tmp_path / "w")
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["height"] == 16 and cfg["guidance_scale"] > 1
    m2 = load_nano(tmp_path / "w")
    x = torch.randn(2, 3, 16, 32)
    with torch.no_grad():
        a = m(x, torch.tensor([0.3, 0.7]), *m.encode(["x", "y"]))
        b = m2(x, torch.tensor([0.3, 0.7]), *m2.encode(["x", "y"]))
    assert torch.allclose(a, b, atol=1e-6)


def test_generate_deterministic():
    m = _model()
    a = generate(m, ["a", "b"], seed=3, num_steps=3)
    b = generate(m, ["a", "b"], seed=3, num_steps=3)
    assert a.shape == (2, 3, 16, 32) and torch.equal(a, b) and a.abs().max() <= 1


def test_lora_targets_transformer_attention():
    peft = __import__("pytest").importorskip("peft")
    m = _model()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    t = peft.get_peft_model(m.transformer, cfg)
    assert sum(p.numel() for n, p in t.named_parameters() if "lora" in n and p.requires_grad) > 0


def test_default_weights_dir():
    assert default_weights_dir("text").name == "text"
