"""Compositional world (GenEval-like), procedurally generated, nothing downloaded.

Scenes of flat coloured circles / squares / triangles on a white 64x64 canvas, at random
sizes and places (layout ``varied``) or in fixed slots (``simple``, what the shipped nano
shapes model was pretrained on).
Categories as GenEval: single_object, two_object, counting, colors, position,
color_attr.  A scene is a JSON-serialisable dict::

    {"category": "color_attr",
     "objects": [{"shape": "circle", "color": "red", "count": 1},
                 {"shape": "square", "color": "blue", "count": 1}],
     "relation": null}            # or "left of" / "right of" / "above" / "below"

``color`` is null where the prompt does not name one.  ``check_scene`` is an exact,
learning-free checker: palette segmentation + connected components + shape
classification by bounding-box fill ratio, returning GenEval-style partial credit
(fraction of the prompt's requirements met).
"""
from __future__ import annotations

import itertools

import numpy as np

HEIGHT = WIDTH = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 205, 0),
    "purple": (140, 50, 180),
    "orange": (255, 135, 0),
}
WHITE = (255, 255, 255)
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4

# ---- held-out combinations (never in training prompts nor training images) ----------
HELDOUT_COLOR_SHAPE = {("red", "triangle"), ("blue", "circle"), ("yellow", "square"),
                       ("green", "triangle"), ("purple", "circle"), ("orange", "square")}
HELDOUT_COUNT = {("circle", 3), ("square", 4), ("triangle", 2)}
HELDOUT_TWO = {("triangle", "circle"), ("square", "triangle")}
HELDOUT_POSITION = {("circle", "left of", "square"), ("square", "above", "triangle"),
                    ("triangle", "right of", "circle"), ("circle", "below", "triangle")}

# checker parameters
MIN_AREA = 20           # px; smaller components are noise
MIN_SIDE = 9            # px of bounding-box width and height; drawn objects are >= 11, patch-sized tiles smaller
COLOR_TOL = 90.0        # max RGB distance to a palette colour
REL_MARGIN = 4.0        # px the centroids must differ by along the relation axis
MIN_SOLIDITY = 0.9      # pixel area / convex-hull area; ragged blobs are not objects


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------- prompts
def scene_prompt(scene: dict) -> str:
    cat, objs, rel = scene["category"], scene["objects"], scene.get("relation")

    def np_(o):  # noun phrase with article
        words = ([o["color"]] if o.get("color") else []) + [o["shape"]]
        return f"{_article(words[0])} {' '.join(words)}"

    if cat in ("single_object", "colors"):
        return f"a photo of {np_(objs[0])}"
    if cat in ("two_object", "color_attr"):
        return f"a photo of {np_(objs[0])} and {np_(objs[1])}"
    if cat == "counting":
        o = objs[0]
        n = o["count"]
        return f"a photo of {NUMBERS[n]} {o['shape'] if n == 1 else _plural(o['shape'])}"
    if cat == "position":
        return f"a photo of {np_(objs[0])} {rel} {np_(objs[1])}"
    raise ValueError(cat)


def _obj(shape, color=None, count=1):
    return {"shape": shape, "color": color, "count": int(count)}


def sample_scene(rng: np.random.Generator, split: str = "train", category: str | None = None) -> dict:
    """Draw a scene; ``split='train'`` avoids every held-out combination, ``'eval'``
    draws only held-out combinations (single_object has no combination to hold out)."""
    cat = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    held = split != "train"
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    cs_pairs = [(c, s) for c in COLORS for s in SHAPES]
    if cat == "single_object":
        return {"category": cat, "objects": [_obj(pick(SHAPES))], "relation": None}
    if cat == "colors":
        pool = [p for p in cs_pairs if (p in HELDOUT_COLOR_SHAPE) == held]
        c, s = pick(pool)
        return {"category": cat, "objects": [_obj(s, c)], "relation": None}
    if cat == "counting":
        pool = [(s, n) for s in SHAPES for n in range(1, MAX_COUNT + 1) if ((s, n) in HELDOUT_COUNT) == held]
        s, n = pick(pool)
        return {"category": cat, "objects": [_obj(s, None, n)], "relation": None}
    if cat == "two_object":
        pool = [p for p in itertools.permutations(SHAPES, 2) if (p in HELDOUT_TWO) == held]
        a, b = pick(pool)
        return {"category": cat, "objects": [_obj(a), _obj(b)], "relation": None}
    if cat == "position":
        pool = [(a, r, b) for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS
                if ((a, r, b) in HELDOUT_POSITION) == held]
        a, r, b = pick(pool)
        return {"category": cat, "objects": [_obj(a), _obj(b)], "relation": r}
    if cat == "color_attr":
        while True:
            s1, s2 = pick(list(itertools.permutations(SHAPES, 2)))
            c1, c2 = pick(list(itertools.permutations(list(COLORS), 2)))
            n_held = ((c1, s1) in HELDOUT_COLOR_SHAPE) + ((c2, s2) in HELDOUT_COLOR_SHAPE)
            if (held and n_held > 0) or (not held and n_held == 0):
                return {"category": cat, "objects": [_obj(s1, c1), _obj(s2, c2)], "relation": None}
    raise ValueError(cat)


def make_prompt_set(split: str, n: int, seed: int) -> list[dict]:
    """Balanced over categories (round robin), deterministic; prompts may repeat."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = sample_scene(rng, split, CATEGORIES[i % len(CATEGORIES)])
        out.append({"prompt": scene_prompt(scene), "metadata": {"world": "shapes", "scene": scene}})
    return out


# ----------------------------------------------------------------------------- rendering
def _allowed_colors(shape: str, train_only: bool) -> list[str]:
    return [c for c in COLORS if not (train_only and (c, shape) in HELDOUT_COLOR_SHAPE)]


def _shape_box(rng, size_lo, size_hi, taken, h, w, region=None, tries=200):
    """Random square box (x0, y0, s) not overlapping ``taken`` (with a gap), inside region."""
    gap = 3
    for _ in range(tries):
        s = int(rng.integers(size_lo, size_hi + 1))
        x_lo, x_hi, y_lo, y_hi = region or (2, w - 2, 2, h - 2)
        if x_hi - x_lo < s or y_hi - y_lo < s:
            continue
        x0 = int(rng.integers(x_lo, x_hi - s + 1))
        y0 = int(rng.integers(y_lo, y_hi - s + 1))
        if all(x0 + s + gap <= tx or tx + ts + gap <= x0 or y0 + s + gap <= ty or ty + ts + gap <= y0
               for tx, ty, ts in taken):
            return x0, y0, s
    return None


def _draw(draw, shape, x0, y0, s, color):
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=color)
    elif shape == "triangle":
        draw.polygon([(x0 + (s - 1) / 2.0, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=color)
    else:
        raise ValueError(shape)


def _simple_boxes(scene: dict, height: int, width: int) -> list[tuple[int, int, int]]:
    """Fixed slots, one box per object in prompt order: one object centred; two side by side
    (stacked for above/below; the relation's subject on its side); three or four in the
    quadrants, row by row."""
    objs = scene["objects"]
    total = sum(o.get("count", 1) for o in objs)
    size = 22 if total == 1 else 18 if total == 2 else 14
    lo, mid, hi = height // 4, height // 2, 3 * height // 4
    left, centre, right = width // 4, width // 2, 3 * width // 4
    if total == 1:
        centres = [(centre, mid)]
    elif total == 2:
        rel = scene.get("relation")
        centres = [(centre, lo), (centre, hi)] if rel in ("above", "below") else [(left, mid), (right, mid)]
        if rel in ("right of", "below"):
            centres.reverse()
    else:
        centres = [(left, lo), (right, lo), (left, hi), (right, hi)][:total]
    return [(cx - size // 2, cy - size // 2, size) for cx, cy in centres]


def render_scene(scene: dict, rng: np.random.Generator | None = None, train_only_colors: bool = True,
                 height: int = HEIGHT, width: int = WIDTH, layout: str = "varied") -> np.ndarray:
    """Render a scene consistent with its prompt into uint8 HxWx3 (white background).

    Objects whose colour is unspecified get a random palette colour (avoiding held-out
    colour/shape pairs when ``train_only_colors``). ``layout="varied"`` draws random sizes
    and places (position relations hold with a clear margin along the relation axis, which
    also dominates the other axis); ``"simple"`` puts objects of one size per count in
    fixed slots (``_simple_boxes``)."""
    from PIL import Image, ImageDraw

    rng = rng if rng is not None else np.random.default_rng(0)
    if layout == "simple":
        img = Image.new("RGB", (width, height), WHITE)
        draw = ImageDraw.Draw(img)
        boxes = iter(_simple_boxes(scene, height, width))
        for o in scene["objects"]:
            col = o.get("color") or _pick(rng, _allowed_colors(o["shape"], train_only_colors))
            for x0, y0, s in itertools.islice(boxes, o.get("count", 1)):
                _draw(draw, o["shape"], x0, y0, s, COLORS[col])
        return np.asarray(img, dtype=np.uint8).copy()
    if layout != "varied":
        raise ValueError(f"layout {layout!r} is not 'varied' or 'simple'")
    for _attempt in range(100):
        img = Image.new("RGB", (width, height), WHITE)
        draw = ImageDraw.Draw(img)
        items = []  # (shape, color, box)
        taken: list[tuple[int, int, int]] = []
        objs = scene["objects"]
        total = sum(o.get("count", 1) for o in objs)
        lo, hi = (14, 24) if total == 1 else (12, 20) if total == 2 else (11, 16)
        ok = True
        if scene["category"] == "position":
            rel = scene["relation"]
            for _ in range(200):
                taken = []
                a = _shape_box(rng, lo, hi, taken, height, width)
                b = _shape_box(rng, lo, hi, [a], height, width) if a else None
                if not (a and b):
                    continue
                ca = (a[0] + a[2] / 2, a[1] + a[2] / 2)
                cb = (b[0] + b[2] / 2, b[1] + b[2] / 2)
                dx, dy = cb[0] - ca[0], cb[1] - ca[1]  # b relative to a
                need = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel]
                other = abs(dy) if rel in ("left of", "right of") else abs(dx)
                if need >= 12 and need > 1.5 * other:
                    taken = [a, b]
                    break
            else:
                ok = False
            if ok:
                for o, box in zip(objs, taken):
                    col = o.get("color") or _pick(rng, _allowed_colors(o["shape"], train_only_colors))
                    items.append((o["shape"], col, box))
        else:
            for o in objs:
                col_fixed = o.get("color")
                col_same = col_fixed or _pick(rng, _allowed_colors(o["shape"], train_only_colors))
                for _k in range(o.get("count", 1)):
                    box = _shape_box(rng, lo, hi, taken, height, width)
                    if box is None:
                        ok = False
                        break
                    taken.append(box)
                    items.append((o["shape"], col_same, box))
                if not ok:
                    break
        if not ok:
            continue
        for shape, col, (x0, y0, s) in items:
            _draw(draw, shape, x0, y0, s, COLORS[col])
        return np.asarray(img, dtype=np.uint8).copy()
    raise RuntimeError(f"could not place scene {scene}")


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


# ----------------------------------------------------------------------------- checker
_PAL_NAMES = list(COLORS)
_PAL = np.array([COLORS[c] for c in _PAL_NAMES] + [WHITE], dtype=np.float32)


def classify_shape(mask: np.ndarray) -> str:
    """Shape of one binary component from its bounding-box fill ratio."""
    ys, xs = np.nonzero(mask)
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = mask.sum() / float(h * w)
    if fill < 0.66:
        return "triangle"
    if fill < 0.9:
        return "circle"
    return "square"


def solidity(mask: np.ndarray) -> float:
    """Pixel area over the convex-hull area of one component (~1.1 for drawn shapes, whose
    hull is traced through pixel centres; speckled blobs score well below 0.9)."""
    import cv2

    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    return float(m.sum()) / max(hull, 1.0)


def detect_objects(image: np.ndarray) -> list[dict]:
    """[{shape, color, cx, cy, area}] found by palette segmentation + components."""
    import cv2

    img = np.asarray(image, dtype=np.float32)[..., :3]
    d = ((img[:, :, None, :] - _PAL[None, None]) ** 2).sum(-1)  # H x W x (P+1)
    lab = d.argmin(-1)
    dmin = np.sqrt(d.min(-1))
    lab[dmin > COLOR_TOL] = len(_PAL_NAMES)  # unknown -> background
    objs = []
    for ci, cname in enumerate(_PAL_NAMES):
        m = (lab == ci).astype(np.uint8)
        if m.sum() < MIN_AREA:
            continue
        n, cc, stats, cents = cv2.connectedComponentsWithStats(m, connectivity=8)
        for k in range(1, n):
            area = int(stats[k, cv2.CC_STAT_AREA])
            if area < MIN_AREA or min(stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT]) < MIN_SIDE:
                continue
            comp = cc == k
            if solidity(comp) < MIN_SOLIDITY:
                continue
            objs.append({"shape": classify_shape(comp), "color": cname, "cx": float(cents[k][0]),
                         "cy": float(cents[k][1]), "area": area})
    return objs


def _rel_ok(a: dict, b: dict, rel: str) -> bool:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    need = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel]
    return need > REL_MARGIN


def scene_requirements(image: np.ndarray, scene: dict) -> list[bool]:
    """Per-requirement pass/fail of a scene (the checker's partial credit terms)."""
    det = detect_objects(image)
    cat, objs = scene["category"], scene["objects"]
    of = lambda s, c=None: [o for o in det if o["shape"] == s and (c is None or o["color"] == c)]  # noqa: E731
    if cat == "single_object":
        return [len(of(objs[0]["shape"])) >= 1]
    if cat == "two_object":
        return [len(of(o["shape"])) >= 1 for o in objs]
    if cat == "counting":
        k = len(of(objs[0]["shape"]))
        return [k >= 1, k == objs[0]["count"]]
    if cat == "colors":
        o = objs[0]
        return [len(of(o["shape"])) >= 1, len(of(o["shape"], o["color"])) >= 1]
    if cat == "color_attr":
        return [len(of(o["shape"])) >= 1 for o in objs] + [len(of(o["shape"], o["color"])) >= 1 for o in objs]
    if cat == "position":
        A, B = of(objs[0]["shape"], objs[0].get("color")), of(objs[1]["shape"], objs[1].get("color"))
        rel = any(_rel_ok(a, b, scene["relation"]) for a in A for b in B)
        return [len(A) >= 1, len(B) >= 1, rel]
    raise ValueError(cat)


def check_scene(image: np.ndarray, scene: dict) -> float:
    """GenEval-style partial credit in [0, 1]: fraction of the prompt's requirements met."""
    req = scene_requirements(image, scene)
    return float(sum(req)) / len(req)


def check_scene_strict(image: np.ndarray, scene: dict) -> float:
    """GenEval's binary per-prompt correctness."""
    return float(all(scene_requirements(image, scene)))
