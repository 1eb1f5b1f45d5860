"""pickscore, pickscore-rank, aesthetic and clip-score, loaded from tiny random CLIP models on disk."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clip_fixtures import IMAGE_SIZE, PROJECTION_DIM, save_tiny_clip
from dgpo_bench.contracts import LoadContext, Prompt
from dgpo_bench.errors import MissingWeightsError, RewardError
from dgpo_bench_rewards.aesthetic import HEAD_FILE, AestheticHead, AestheticReward
from dgpo_bench_rewards.clip_score import ClipScoreReward
from dgpo_bench_rewards.pickscore import PickScoreRankReward, PickScoreReward

CPU = LoadContext(device=torch.device("cpu"))
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = [Prompt("a photo of a cat"), Prompt("a red car on a road"), Prompt("a photo of a cat"),
           Prompt("the word hello on a sign")]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    torch.manual_seed(1)
    torch.save(AestheticHead(PROJECTION_DIM).state_dict(), folder / HEAD_FILE)
    return folder


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, 48, 40, 3), dtype=np.uint8)


def reference_pixels(images):
    """CLIP preprocessing written out: shortest side to 32 (bicubic), centre crop, normalise."""
    out = []
    for im in images:
        h, w = im.shape[:2]
        s = IMAGE_SIZE / min(h, w)
        size = (round(w * s), round(h * s))
        resized = np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC), dtype=np.float64) / 255
        top, left = (size[1] - IMAGE_SIZE) // 2, (size[0] - IMAGE_SIZE) // 2
        crop = resized[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
        out.append(((crop - MEAN) / STD).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


def reference_logits(folder, images, prompts):
    """logit_scale * cosine from CLIPModel.forward (transformers' own path)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tok = CLIPTokenizer.from_pretrained(folder)(
        [p.text for p in prompts], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    pixel_values=reference_pixels(images))
    return out.logits_per_image.diagonal().numpy().astype(np.float64), float(model.logit_scale.detach().exp())


def test_pickscore_is_logit_scale_times_cosine(clip_dir, images):
    reward = PickScoreReward({"path": str(clip_dir)})
    reward.load(CPU)
    expected, _ = reference_logits(clip_dir, images, PROMPTS)
    np.testing.assert_allclose(reward.score(images, PROMPTS), expected, rtol=0, atol=2e-3)
    changed = images.copy()
    changed[0] = 255 - changed[0]
    moved = reward.score(changed, PROMPTS)
    assert moved[0] != pytest.approx(expected[0], abs=1e-3)
    np.testing.assert_allclose(moved[1:], reward.score(images, PROMPTS)[1:], atol=1e-6)


def test_pickscore_rank_ranks_within_the_group(clip_dir, images):
    group = np.concatenate([images, images[:2]])  # duplicates tie
    prompts = [Prompt("a photo of a cat")] * len(group)
    rank = PickScoreRankReward({"path": str(clip_dir)})
    rank.load(CPU)
    assert PickScoreRankReward.groupwise and not PickScoreReward.groupwise
    raw, _ = reference_logits(clip_dir, group, prompts)
    less = np.array([sum(r < x - 1e-3 for r in raw) for x in raw])
    ties = np.array([sum(abs(r - x) <= 1e-3 for r in raw) for x in raw])
    np.testing.assert_allclose(rank.score(group, prompts), (less + (ties - 1) / 2) / (len(group) - 1), atol=1e-12)


def test_clip_score_is_100_times_clipped_cosine(clip_dir, images, tmp_path):
    # the tiny model's cosines are all negative; negating its image projection flips their signs
    flipped = tmp_path / "flipped"
    shutil.copytree(clip_dir, flipped)
    state = load_file(str(flipped / "model.safetensors"))
    state["visual_projection.weight"] = -state["visual_projection.weight"]
    save_file(state, str(flipped / "model.safetensors"), metadata={"format": "pt"})
    prompts = [Prompt(t) for t in ("a cat", "zebra stripes", "a small blue boat", "qwerty")]
    scores = []
    for folder in (clip_dir, flipped):
        reward = ClipScoreReward({"path": str(folder)})
        reward.load(CPU)
        logits, scale = reference_logits(folder, images, prompts)
        scores.append(reward.score(images, prompts))
        np.testing.assert_allclose(scores[-1], 100 * np.maximum(logits / scale, 0), atol=1e-3)
    assert (scores[0] == 0).all() and (scores[1] > 0).all()


def test_aesthetic_is_the_mlp_on_unit_image_embeddings(clip_dir, images, tmp_path):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=reference_pixels(images)).pooler_output)
    x = (emb / emb.norm(dim=-1, keepdim=True)).double()
    state = {k: v.double() for k, v in torch.load(clip_dir / HEAD_FILE, weights_only=True).items()}
    for i in (0, 2, 4, 6, 7):  # Linear layers; dropout is off at inference and there are no activations
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    expected = x.squeeze(-1).numpy()

    reward = AestheticReward({"path": str(clip_dir)})  # head found by its released file name
    reward.load(CPU)
    np.testing.assert_allclose(reward.score(images, PROMPTS), expected, atol=1e-4)
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp_path / "head.safetensors"))
    again = AestheticReward({"path": str(clip_dir), "head": str(tmp_path / "head.safetensors")})
    again.load(CPU)
    np.testing.assert_allclose(again.score(images, PROMPTS), expected, atol=1e-4)
    assert len(set(np.round(expected, 6))) == len(images)  # the score depends on the image


@pytest.mark.parametrize("cls,option,env", [(PickScoreReward, "pickscore.path", "DGPO_BENCH_PICKSCORE_PATH"),
                                            (AestheticReward, "aesthetic.path", "DGPO_BENCH_AESTHETIC_PATH"),
                                            (ClipScoreReward, "clip-score.path", "DGPO_BENCH_CLIP_PATH")])
def test_missing_weights_say_what_is_needed_and_where(cls, option, env, monkeypatch, tmp_path):
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(MissingWeightsError, match=f"-o {option}=FOLDER or set {env}=FOLDER"):
        cls().load(CPU)
    with pytest.raises(MissingWeightsError, match=f"missing at {tmp_path}"):
        cls({"path": str(tmp_path)}).load(CPU)


def test_weights_come_from_the_environment_variable(clip_dir, images, monkeypatch):
    monkeypatch.setenv("DGPO_BENCH_PICKSCORE_PATH", str(clip_dir))
    reward = PickScoreReward()
    reward.load(CPU)
    np.testing.assert_allclose(reward.score(images, PROMPTS), reference_logits(clip_dir, images, PROMPTS)[0], atol=2e-3)


def test_aesthetic_head_missing_is_named(clip_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match="aesthetic head weights are missing"):
        AestheticReward({"path": str(clip_dir), "head": str(tmp_path / "nope.pth")}).load(CPU)


def test_nan_from_a_broken_model_is_an_error_not_a_score(clip_dir, images, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["visual_projection.weight"] = torch.full_like(state["visual_projection.weight"], float("nan"))
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    reward = PickScoreReward({"path": str(broken)})
    reward.load(CPU)
    with pytest.raises(RewardError, match="non-finite score"):
        reward.score(images, PROMPTS)
