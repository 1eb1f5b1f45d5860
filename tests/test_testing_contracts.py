"""dgpo_bench.testing: every first-party reward passes the contract checks, and the checks catch violations."""

import threading
import typing

import numpy as np
import pytest
import torch
from pydantic import ConfigDict

from clip_fixtures import PROJECTION_DIM, save_tiny_clip
from dgpo_bench.contracts import LoadContext, Options, Prompt, Reward, Sampler
from dgpo_bench.testing import ContractViolation, check_component_class, check_light_import, check_reward
from dgpo_bench_rewards.aesthetic import HEAD_FILE, AestheticHead
from dgpo_bench_rewards.compositional import CompositionalReward
from dgpo_bench_rewards.plugin import REWARDS
from dgpo_bench_rewards.server import RewardServer
from dgpo_bench_tasks.shapes import render_scene
from dgpo_bench_tasks.text import render_text


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    torch.manual_seed(1)
    torch.save(AestheticHead(PROJECTION_DIM).state_dict(), folder / HEAD_FILE)
    return str(folder)


@pytest.fixture(scope="module")
def compositional_server():
    reward = CompositionalReward()
    server = RewardServer(reward, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()


def text_batch(n=4):
    from dgpo_bench_rewards.ocr import OcrReward

    prompts = OcrReward().prompts("eval")[:n]
    rng = np.random.default_rng(0)
    return np.stack([render_text(p.metadata["target"] if i % 2 else "other", rng) for i, p in enumerate(prompts)]), prompts


def shapes_batch(n=4):
    prompts = CompositionalReward().prompts("eval")[:n]
    return np.stack([render_scene(p.metadata["scene"], np.random.default_rng(i)) for i, p in enumerate(prompts)]), prompts


def test_every_first_party_reward_passes_check_reward(clip_dir, compositional_server):
    text_images, text_prompts = text_batch()
    shape_images, shape_prompts = shapes_batch()
    photos = np.random.default_rng(1).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    cases = {
        "ocr": ({}, text_images, text_prompts),
        "compositional": ({}, shape_images, shape_prompts),
        "pickscore": ({"path": clip_dir}, photos, [Prompt("a cat")] * 4),
        "pickscore-rank": ({"path": clip_dir}, photos, [Prompt("a cat")] * 4),
        "aesthetic": ({"path": clip_dir}, photos, [Prompt("a cat")] * 4),
        "clip-score": ({"path": clip_dir}, photos, [Prompt("a cat"), Prompt("a dog"), Prompt("x"), Prompt("y")]),
        "remote": ({"url": compositional_server}, shape_images, shape_prompts),
    }
    assert set(cases) == {cls.name for cls in REWARDS}
    scores = {cls.name: check_reward(cls, *cases[cls.name], check_import=False) for cls in REWARDS}
    np.testing.assert_array_equal(scores["ocr"][1::2], [1.0, 1.0])
    np.testing.assert_array_equal(scores["compositional"], np.ones(4))
    np.testing.assert_array_equal(scores["remote"], scores["compositional"])
    np.testing.assert_array_equal(np.sort(scores["pickscore-rank"]), [0, 1 / 3, 2 / 3, 1])


def test_first_party_rewards_import_and_construct_without_heavy_libraries():
    check_light_import(*REWARDS)


# --------------------------------------------------------------------------- violations


class Good(Reward):
    """Mean brightness."""

    name = "good"
    score_range: typing.ClassVar = (0.0, 1.0)

    def score(self, images, prompts):
        return images.mean(axis=(1, 2, 3)) / 255.0


class Loose(Good):
    """Options that accept anything."""

    name = "loose"

    class Options(Options):
        model_config = ConfigDict(extra="allow")


class BadName(Good):
    """Not kebab-case."""

    name = "Bad_Name"


class NotANumber(Good):
    """Hides nothing but returns NaN."""

    name = "not-a-number"

    def score(self, images, prompts):
        return np.full(len(images), np.nan)


class BatchDependent(Good):
    """Compares each image with the batch without declaring groupwise."""

    name = "batch-dependent"
    score_range = None

    def score(self, images, prompts):
        m = images.mean(axis=(1, 2, 3))
        return m - m.mean()


class OutOfRange(Good):
    """Declares [0, 1] and returns more."""

    name = "out-of-range"

    def score(self, images, prompts):
        return images.mean(axis=(1, 2, 3)) + 2.0


class Noisy(Good):
    """Different scores each call."""

    name = "noisy"

    def score(self, images, prompts):
        return np.random.default_rng().random(len(images))


class AsList(Good):
    """Returns a list."""

    name = "as-list"

    def score(self, images, prompts):
        return [0.5] * len(images)


IMAGES = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
PROMPTS = [Prompt("x")] * 4


def test_a_good_reward_passes_and_returns_its_scores():
    np.testing.assert_allclose(check_reward(Good, {}, IMAGES, PROMPTS, check_import=False),
                               IMAGES.mean(axis=(1, 2, 3)) / 255.0)


@pytest.mark.parametrize("cls,message", [
    (Loose, "accepts unknown keys"),
    (BadName, "kebab-case"),
    (NotANumber, "non-finite"),
    (BatchDependent, "depends on the rest of the batch"),
    (OutOfRange, "outside the declared score_range"),
    (Noisy, "not deterministic"),
    (AsList, "must return a float numpy array"),
])
def test_check_reward_catches_each_violation(cls, message):
    with pytest.raises(ContractViolation, match=message):
        check_reward(cls, {}, IMAGES, PROMPTS, check_import=False)


def test_check_component_class_works_for_any_kind():
    class Stepper(Sampler):
        """A sampler."""

        name = "stepper"

    class Undocumented(Sampler):
        name = "undocumented"

    class Impostor(Sampler):
        """Claims to be a reward."""

        name = "impostor"
        kind = "reward"

    check_component_class(Stepper)
    with pytest.raises(ContractViolation, match="needs a docstring"):
        check_component_class(Undocumented)
    with pytest.raises(ContractViolation, match="kind is 'reward'"):
        check_component_class(Impostor)


def test_check_light_import_catches_heavy_imports_at_construction(tmp_path, monkeypatch):
    (tmp_path / "heavy_reward_module.py").write_text(
        "from dgpo_bench.contracts import Reward\n\n"
        "class Heavy(Reward):\n"
        "    '''Imports OpenCV when built.'''\n"
        "    name = 'heavy'\n\n"
        "    def __init__(self, options=None):\n"
        "        super().__init__(options)\n"
        "        import cv2  # noqa: F401\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    from heavy_reward_module import Heavy

    with pytest.raises(ContractViolation, match="imports cv2; import heavy libraries inside load"):
        check_light_import(Heavy)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_nano_backbone_trains_through_the_prepared_module(tiny_weights, lora_rank):
    from dgpo_bench.testing import check_backbone_training
    from dgpo_bench_backbones.nano.backbone import NanoBackbone

    bb = NanoBackbone({"weights": str(tiny_weights), "lora_rank": lora_rank, "autocast": "off"})
    bb.load(LoadContext(device=torch.device("cpu")))
    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    check_backbone_training(bb, x, torch.tensor([0.3, 0.8]), ["a", "b"])


def test_check_backbone_training_catches_a_forward_around_the_prepared_module(tiny_weights):
    from dgpo_bench.testing import check_backbone_training
    from dgpo_bench_backbones.nano.backbone import NanoBackbone

    class Bypass(NanoBackbone):
        """Calls its transformer directly, so DDP would never synchronise its gradients."""

        @property
        def policy_module(self):
            return self.transformer

    bb = Bypass({"weights": str(tiny_weights), "autocast": "off"})
    bb.load(LoadContext(device=torch.device("cpu")))
    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ContractViolation, match="did not call the prepared module"):
        check_backbone_training(bb, x, torch.tensor([0.3, 0.8]), ["a", "b"])
