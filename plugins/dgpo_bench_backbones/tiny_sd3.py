"""A randomly initialised, tiny Stable Diffusion 3.5-style pipeline folder, built offline.

Same components and folder layout as a real SD3.5 checkpoint (MM-DiT with a dual
attention layer and qk RMS norm, two CLIP text encoders with projection, a T5 encoder,
an AutoencoderKL, the flow-matching scheduler with shift 3), at a size that runs in
seconds on a CPU. For tests and smoke runs of the ``sd3`` backbone; nothing is downloaded.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

_LETTERS = string.ascii_lowercase + string.digits + "\"'.,!?-"


def _clip_tokenizer(max_length: int):
    """A byte-level BPE CLIP tokenizer whose vocabulary is single characters (no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _LETTERS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tok.model_max_length = max_length
    return tok


def _t5_tokenizer(max_length: int):
    """A unigram T5 tokenizer over single characters and word starts."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _LETTERS] + [("\u2581" + c, -2.5) for c in _LETTERS]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def build_tiny_sd3(path: str | Path, seed: int = 0, dim: int = 32):
    """Write a tiny random SD3 pipeline to ``path`` and return it (fp32, CPU)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok = _clip_tokenizer(77)
    t5_tok = _t5_tokenizer(512)
    clip_cfg = dict(vocab_size=len(clip_tok), hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=2,
                    num_hidden_layers=2, projection_dim=dim, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                    max_position_embeddings=77)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=2 * dim, d_kv=16, d_ff=4 * dim,
                                             num_layers=2, num_heads=2, pad_token_id=0, eos_token_id=1))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=2 * dim, caption_projection_dim=32, pooled_projection_dim=2 * dim,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=_clip_tokenizer(77),
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(str(path))
    return pipe
