"""Procedural worlds: OCR similarity, OCR ceiling, shapes checker, prompt splits."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from dgpo_bench_tasks import load_prompts
from dgpo_bench_tasks import shapes as S
from dgpo_bench_tasks import text as T


def test_ocr_similarity_numbers():
    assert T.ocr_similarity("cargo", "cargo") == 1.0
    assert T.ocr_similarity("the CARGO ship", "cargo") == 1.0  # substring after lower/strip
    assert T.ocr_similarity("hello world", "helloworld") == 1.0
    assert T.ocr_similarity("carg", "cargo") == pytest.approx(0.8)
    assert T.ocr_similarity("cxrgo", "cargo") == pytest.approx(0.8)
    assert T.ocr_similarity("", "cargo") == 0.0
    assert T.ocr_similarity("zzzzzzzzzzzz", "cargo") == 0.0
    assert T.levenshtein("kitten", "sitting") == 3


def test_render_text_fits_and_is_rgb():
    rng = np.random.default_rng(0)
    for item in load_prompts("text", "eval")[:64]:
        im = T.render_text(item["metadata"]["target"], rng)
        assert im.shape == (T.HEIGHT, T.WIDTH, 3) and im.dtype == np.uint8
        # text does not touch the left/right border columns
        bg = im[:, 0].astype(int)
        assert np.abs(im[:, 0].astype(int) - bg[0]).max() == 0


def test_simple_layout_is_black_on_white_centred_at_the_largest_size():
    rng = np.random.default_rng(0)
    for target in ("cargo", "hold tight", "ab"):
        im = T.render_text(target, rng, layout="simple")
        ink = np.argwhere(im.min(-1) < 128)
        assert (im == im[..., :1]).all()  # grey levels only: black text, white ground, antialiasing
        assert (im[0, 0] == 255).all()
        left, right = ink[:, 1].min(), T.WIDTH - 1 - ink[:, 1].max()
        assert abs(left - right) <= 3  # centred horizontally, up to the glyphs' side bearings
        same = T.render_text(target, None)  # the deterministic render: centred, largest size
        assert (same.min(-1) < 128).sum() == len(ink)  # same glyphs at the same size


def test_varied_layout_moves_and_colours_the_text():
    rng = np.random.default_rng(0)
    ims = [T.render_text("cargo", rng) for _ in range(16)]
    lefts = {int(np.argwhere(im.min(-1) < 128)[:, 1].min()) for im in ims}
    assert len(lefts) > 4 and any((im[0, 0] != 255).any() for im in ims)


def test_ocr_ceiling_on_ground_truth_renders():
    from dgpo_bench_tasks.ocr_engine import RapidOCRReader

    items = load_prompts("text", "eval")[:32]
    rng = np.random.default_rng(1)
    imgs = [T.render_text(it["metadata"]["target"], rng) for it in items]
    out = RapidOCRReader(num_threads=2).read(imgs)
    scores = [T.ocr_similarity(o, it["metadata"]["target"]) for o, it in zip(out, items)]
    assert np.mean(scores) >= 0.95


def test_text_splits_disjoint():
    train, held = T.word_split()
    assert not set(train) & set(held)
    words = lambda split: {w for it in load_prompts("text", split) for w in it["metadata"]["target"].split()}  # noqa: E731
    assert not words("train") & words("eval")
    assert words("eval") <= set(held)
    assert len(load_prompts("text", "eval")) >= 512


def test_prompt_files_match_generator():
    from dgpo_bench_tasks.prompts import make_prompts

    for world in ("text", "shapes"):
        assert make_prompts(world, "eval")[:50] == load_prompts(world, "eval")[:50]


@pytest.mark.parametrize("layout", ["varied", "simple"])
def test_shapes_checker_on_ground_truth(layout):
    rng = np.random.default_rng(0)
    scores = []
    for split in ("train", "eval"):
        for i in range(36):
            scene = S.sample_scene(rng, split, S.CATEGORIES[i % len(S.CATEGORIES)])
            scores.append(S.check_scene(S.render_scene(scene, rng, layout=layout), scene))
    assert np.mean(scores) >= 0.98


def test_shapes_simple_layout_puts_objects_in_fixed_slots():
    circle, square = ({"shape": s, "color": None, "count": 1} for s in ("circle", "square"))
    pos = {"category": "position", "relation": "right of", "objects": [circle, square]}
    a, b = (S.render_scene(pos, np.random.default_rng(i), layout="simple") for i in (1, 2))
    assert ((a != 255).any(-1) == (b != 255).any(-1)).all()  # same places, whatever the colours
    found = sorted(S.detect_objects(a), key=lambda o: o["cx"])
    assert [o["shape"] for o in found] == ["square", "circle"]  # the circle is right of the square
    assert S.check_scene(a, pos) == 1.0
    below = {**pos, "relation": "below"}
    assert [o["shape"] for o in sorted(S.detect_objects(S.render_scene(below, layout="simple")),
                                       key=lambda o: o["cy"])] == ["square", "circle"]
    with pytest.raises(ValueError, match="layout 'grid'"):
        S.render_scene(pos, layout="grid")


def test_shapes_checker_partial_credit():
    rng = np.random.default_rng(0)
    scene = {"category": "color_attr", "relation": None,
             "objects": [{"shape": "circle", "color": "red", "count": 1},
                         {"shape": "square", "color": "blue", "count": 1}]}
    img = S.render_scene(scene, rng)
    assert S.check_scene(img, scene) == 1.0
    swapped = {**scene, "objects": [{"shape": "circle", "color": "blue", "count": 1},
                                     {"shape": "square", "color": "red", "count": 1}]}
    assert S.check_scene(img, swapped) == 0.5
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert S.check_scene(blank, scene) == 0.0
    pos = {"category": "position", "relation": "left of",
           "objects": [{"shape": "circle", "color": None, "count": 1},
                       {"shape": "square", "color": None, "count": 1}]}
    img = S.render_scene(pos, rng)
    assert S.check_scene(img, pos) == 1.0
    assert S.check_scene(img, {**pos, "relation": "right of"}) == pytest.approx(2 / 3)
    cnt = {"category": "counting", "relation": None, "objects": [{"shape": "triangle", "color": None, "count": 3}]}
    img = S.render_scene(cnt, rng)
    assert S.check_scene(img, cnt) == 1.0
    assert S.check_scene(img, {**cnt, "objects": [{"shape": "triangle", "color": None, "count": 2}]}) == 0.5


def test_shapes_heldout_combinations_not_in_train():
    def combos(items):
        out = set()
        for it in items:
            sc = it["metadata"]["scene"]
            if sc["category"] in ("colors", "color_attr"):
                out |= {(o["color"], o["shape"]) for o in sc["objects"]}
        return out

    assert not combos(load_prompts("shapes", "train")) & S.HELDOUT_COLOR_SHAPE
    ev = load_prompts("shapes", "eval")
    assert len(ev) >= 512
    train_prompts = {it["prompt"] for it in load_prompts("shapes", "train")}
    for it in ev:
        if it["metadata"]["scene"]["category"] != "single_object":
            assert it["prompt"] not in train_prompts
    for it in ev[:24]:
        assert S.scene_prompt(it["metadata"]["scene"]) == it["prompt"]
