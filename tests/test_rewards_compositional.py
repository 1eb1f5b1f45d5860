"""The compositional reward: GenEval-style partial credit from the exact shapes-world checker."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dgpo_bench.contracts import Prompt
from dgpo_bench.errors import RewardError
from dgpo_bench_rewards.compositional import CompositionalReward
from dgpo_bench_tasks.shapes import COLORS, render_scene

WHITE = (255, 255, 255)


def draw(*items):
    """A 64x64 white image with (shape, colour, x0, y0, size) items drawn by hand."""
    img = Image.new("RGB", (64, 64), WHITE)
    d = ImageDraw.Draw(img)
    for shape, color, x, y, s in items:
        box = [x, y, x + s - 1, y + s - 1]
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=COLORS[color])
    return np.asarray(img, dtype=np.uint8)


def scene(category, objects, relation=None):
    return {"category": category, "relation": relation,
            "objects": [{"shape": s, "color": c, "count": n} for s, c, n in objects]}


def test_ground_truth_scenes_of_every_category_score_one():
    reward = CompositionalReward()
    prompts = reward.prompts("eval")[:36] + reward.prompts("train")[:36]  # 6 rounds of the 6 categories each
    assert {p.metadata["scene"]["category"] for p in prompts} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    rng = np.random.default_rng(0)
    images = np.stack([render_scene(p.metadata["scene"], rng) for p in prompts])
    np.testing.assert_array_equal(reward.score(images, prompts), np.ones(len(prompts)))


def test_partial_credit_is_the_fraction_of_requirements_met():
    cases = [
        # colour attribute: both shapes present (2/2), red circle right, blue square drawn green -> 3 of 4
        (scene("color_attr", [("circle", "red", 1), ("square", "blue", 1)]),
         draw(("circle", "red", 5, 5, 18), ("square", "green", 35, 35, 18)), 3 / 4),
        # counting three circles, two drawn: "at least one" holds, "exactly three" fails -> 1 of 2
        (scene("counting", [("circle", None, 3)]),
         draw(("circle", "blue", 5, 5, 16), ("circle", "red", 40, 40, 16)), 1 / 2),
        # circle left of a square, drawn the other way round: both found, relation wrong -> 2 of 3
        (scene("position", [("circle", None, 1), ("square", None, 1)], "left of"),
         draw(("square", "purple", 5, 20, 18), ("circle", "orange", 40, 20, 18)), 2 / 3),
        # colours: a yellow triangle asked for, an orange triangle drawn -> 1 of 2
        (scene("colors", [("triangle", "yellow", 1)]), draw(("triangle", "orange", 20, 20, 22)), 1 / 2),
        # two objects, nothing drawn -> 0 of 2
        (scene("two_object", [("circle", None, 1), ("triangle", None, 1)]), draw(), 0.0),
        # single object drawn correctly -> 1
        (scene("single_object", [("square", None, 1)]), draw(("square", "red", 20, 20, 20)), 1.0),
    ]
    images = np.stack([img for _, img, _ in cases])
    prompts = [Prompt("p", {"scene": s}) for s, _, _ in cases]
    expected = np.array([e for _, _, e in cases])
    np.testing.assert_allclose(CompositionalReward().score(images, prompts), expected, atol=1e-12)
    np.testing.assert_array_equal(CompositionalReward({"strict": True}).score(images, prompts), expected == 1.0)


def test_prompt_sets_are_shapes_prompts_with_scenes():
    reward = CompositionalReward()
    train, held = reward.prompts("train"), reward.prompts("eval")
    assert (len(train), len(held)) == (4096, 1024)
    assert all(p.metadata["world"] == "shapes" and "scene" in p.metadata for p in train[:50] + held[:50])


def test_prompts_without_a_scene_are_an_error():
    with pytest.raises(RewardError, match="no 'scene' metadata"):
        CompositionalReward().score(np.full((1, 64, 64, 3), 255, np.uint8), [Prompt('a sign that says "hi"')])


def test_ragged_blobs_are_not_objects():
    """Speckle of the right colour (what an undertrained model paints) earns no credit."""
    from dgpo_bench_tasks.shapes import detect_objects

    solid = np.full((64, 64, 3), 255, np.uint8)
    solid[20:40, 20:40] = COLORS["red"]
    rng = np.random.default_rng(0)
    speckled = solid.copy()
    holes = rng.random((64, 64)) < 0.35
    speckled[holes & (solid != 255).any(-1)] = 255
    assert [o["shape"] for o in detect_objects(solid)] == ["square"]
    assert detect_objects(speckled) == []


def test_patch_sized_tiles_are_not_objects():
    """Solid tiles smaller than the smallest drawn object (what a patch-8 model paints at
    random places) earn no credit; the smallest object the world draws still counts."""
    from PIL import Image, ImageDraw

    from dgpo_bench_tasks.shapes import detect_objects

    tiles = np.full((64, 64, 3), 255, np.uint8)
    tiles[8:16, 8:16] = COLORS["red"]
    tiles[40:48, 24:32] = COLORS["blue"]
    tiles[30:38, 50:54] = COLORS["green"]
    assert detect_objects(tiles) == []
    smallest = np.full((64, 64, 3), 255, np.uint8)
    ImageDraw.Draw(pil := Image.fromarray(smallest)).polygon([(5, 0), (0, 10), (10, 10)], fill=COLORS["red"])
    assert [o["shape"] for o in detect_objects(np.asarray(pil))] == ["triangle"]  # side 11, as drawn at 4 objects
