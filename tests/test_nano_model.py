"""Nano model: shapes of encode/forward, CFG null prompt, save/load round trip, sampler."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import torch

from dgpo_bench_backbones.nano.model import (NanoConfig, NanoModel, default_weights_dir, generate,
                                             load_nano, quote_positions, save_nano, tokenize)

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


def test_quote_positions_mark_the_quoted_target():
    prompt = 'a sign that says "cargo bay"'
    pos, length = quote_positions([prompt, "no quotes", 'x ""'], 40, 8)
    ids, _ = tokenize([prompt], 40)
    inside = pos[0].nonzero().flatten()
    # the tokens marked 1..8 are the first 8 characters of the target, after the bos token
    assert pos[0, inside].tolist() == list(range(1, 9))
    assert "".join(prompt[i - 1] for i in inside.tolist()) == "cargo ba"
    assert set(length[0, inside].tolist()) == {8} and length[0].count_nonzero() == 8
    assert pos[1:].count_nonzero() == 0 and length[1:].count_nonzero() == 0
    assert ids[0, inside[0]] != ids[0, inside[0] - 1]  # the opening quote itself is not marked


def test_quote_embedding_enters_the_encoding():
    torch.manual_seed(0)
    m = NanoModel(NanoConfig(**TINY, quote_max_len=8)).eval()
    with torch.no_grad():
        a, _ = m.encode(['say "ab"', "say ab"])
        m.text_encoder.quote_pos.weight[1].add_(torch.randn(32))  # a constant would vanish in LayerNorm
        b, _ = m.encode(['say "ab"', "say ab"])
    assert (a[0] - b[0]).abs().max() > 1e-2  # the quoted prompt changes
    assert torch.equal(a[1], b[1])  # a prompt without quotes does not


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
