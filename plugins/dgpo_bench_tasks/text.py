"""Text-rendering world (Flow-GRPO OCR-like), procedurally generated, nothing downloaded.

Prompts such as ``a sign that says "cargo"``; the target is a single word (3-8 letters)
or, one time in four, a two-word phrase from an offline vocabulary (frequent lower-case tokens of the
Python standard library source, frozen in ``data/vocab.txt``).  Images are 32x128 RGB
renders with Pillow's bundled font in one of two layouts: ``varied`` (a random size up to
4 px under the largest that fits, random position, dark text colour on a light
background) and ``simple`` (the largest size, centred horizontally, black on white).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
VOCAB_FILE = DATA_DIR / "vocab.txt"

HEIGHT, WIDTH = 32, 128
MIN_FONT, MAX_FONT = 14, 24
MARGIN = 4  # px kept free left/right
P_PAIR = 0.25  # share of two-word targets
MAX_PHRASE_LEN = 11  # characters including the space
VOCAB_SIZE = 4000
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 1234

TEMPLATES = (
    'a sign that says "{}"',
    'a poster with the text "{}"',
    'the word "{}" written on a wall',
    'a label reading "{}"',
    'a banner that reads "{}"',
    'a storefront sign with "{}" on it',
    '"{}" in bold letters',
    'a t-shirt printed with "{}"',
)


# ----------------------------------------------------------------------------- reward
def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _norm(s: str) -> str:
    return s.lower().replace(" ", "")


def ocr_similarity(recognized: str, target: str) -> float:
    """Flow-GRPO OCR score: lower-case, drop spaces; 1 if target is a substring of the
    recognized text, else max(0, 1 - lev(recognized, target) / len(target))."""
    r, t = _norm(recognized), _norm(target)
    if len(t) == 0:
        return 1.0 if len(r) == 0 else 0.0
    if t in r:
        return 1.0
    return max(0.0, 1.0 - levenshtein(r, t) / len(t))


def exact_match(recognized: str, target: str) -> bool:
    return _norm(recognized) == _norm(target)


# ----------------------------------------------------------------------------- vocabulary
def build_vocab_from_stdlib(size: int = VOCAB_SIZE) -> list[str]:
    """Most frequent [a-z]{3,8} tokens of the stdlib source (ties alphabetical)."""
    root = Path(os.__file__).resolve().parent
    counts: collections.Counter = collections.Counter()
    pat = re.compile(r"(?<![A-Za-z0-9_])[a-z]{3,8}(?![A-Za-z0-9_])")
    for p in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in p.parts or "test" in p.parts:
            continue
        try:
            counts.update(pat.findall(p.read_text(encoding="utf-8", errors="ignore")))
        except OSError:
            continue
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return sorted(w for w, _ in ranked[:size])


@functools.lru_cache(maxsize=1)
def vocab() -> tuple[str, ...]:
    words = [w.strip() for w in VOCAB_FILE.read_text().split() if w.strip()]
    return tuple(words)


@functools.lru_cache(maxsize=1)
def word_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train_words, heldout_words), disjoint, deterministic."""
    words = list(vocab())
    rng = np.random.default_rng(SPLIT_SEED)
    perm = rng.permutation(len(words))
    n_held = int(round(HELDOUT_FRACTION * len(words)))
    held = tuple(sorted(words[i] for i in perm[:n_held]))
    train = tuple(sorted(words[i] for i in perm[n_held:]))
    return train, held


def sample_target(rng: np.random.Generator, words, p_pair: float = P_PAIR) -> str:
    if rng.random() < p_pair:
        for _ in range(100):
            a, b = words[rng.integers(len(words))], words[rng.integers(len(words))]
            if a != b and len(a) + 1 + len(b) <= MAX_PHRASE_LEN:
                return f"{a} {b}"
    return words[rng.integers(len(words))]


def make_prompt(target: str, template_idx: int) -> str:
    return TEMPLATES[template_idx % len(TEMPLATES)].format(target)


def sample_example(rng: np.random.Generator, split: str = "train") -> tuple[str, str]:
    """(prompt, target) drawn from the split's words (pretraining data)."""
    train, held = word_split()
    words = train if split == "train" else held
    target = sample_target(rng, words)
    return make_prompt(target, int(rng.integers(len(TEMPLATES)))), target


def make_prompt_set(split: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        prompt, target = sample_example(rng, split)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "metadata": {"world": "text", "target": target}})
    return out


# ----------------------------------------------------------------------------- rendering
@dataclasses.dataclass(frozen=True)
class Layout:
    """How a target is drawn when rendering with an rng (the vertical position is always random)."""

    size_spread: int  # px below the largest fitting font size
    free_x: bool  # anywhere horizontally (else centred)
    colours: bool  # dark text colour on a light background (else black on white)


LAYOUTS = {"varied": Layout(size_spread=4, free_x=True, colours=True),
           "simple": Layout(size_spread=0, free_x=False, colours=False)}


@functools.lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _fits(text: str, size: int, height: int, width: int) -> bool:
    l, t, r, b = _font(size).getbbox(text)
    return (r - l) <= width - 2 * MARGIN and (b - t) <= height - 4


def max_font_size(text: str, height: int = HEIGHT, width: int = WIDTH) -> int:
    for s in range(MAX_FONT, MIN_FONT - 1, -1):
        if _fits(text, s, height, width):
            return s
    return MIN_FONT


def render_text(
    text: str,
    rng: np.random.Generator | None = None,
    height: int = HEIGHT,
    width: int = WIDTH,
    font_size: int | None = None,
    fg: tuple[int, int, int] | None = None,
    bg: tuple[int, int, int] | None = None,
    layout: str = "varied",
) -> np.ndarray:
    """Render ``text`` into a uint8 HxWx3 image.

    With ``rng`` None: centred, largest fitting font, black on white.  With an rng: drawn
    as ``LAYOUTS[layout]`` says, at a random height.
    """
    from PIL import Image, ImageDraw

    smax = max_font_size(text, height, width)
    if rng is None:
        size = font_size or smax
        fg = fg or (0, 0, 0)
        bg = bg or (255, 255, 255)
    else:
        lay = LAYOUTS[layout]
        size = font_size or int(rng.integers(max(MIN_FONT, smax - lay.size_spread), smax + 1))
        if lay.colours:
            fg = fg or tuple(int(v) for v in rng.integers(0, 100, size=3))
            bg = bg or tuple(int(v) for v in rng.integers(205, 256, size=3))
        fg, bg = fg or (0, 0, 0), bg or (255, 255, 255)
    font = _font(size)
    l, t, r, b = font.getbbox(text)
    tw, th = r - l, b - t
    free_x, free_y = max(0, width - tw), max(0, height - th)
    if rng is None:
        ox, oy = free_x // 2, free_y // 2
    else:
        jx = max(0, free_x - 2 * MARGIN)
        jy = max(0, free_y - 2)
        ox = MARGIN + int(rng.integers(0, jx + 1)) if free_x >= 2 * MARGIN else free_x // 2
        if not lay.free_x:  # centred; the draw above is kept so both layouts consume the rng alike
            ox = free_x // 2
        oy = 1 + int(rng.integers(0, jy + 1)) if free_y >= 2 else free_y // 2
    img = Image.new("RGB", (width, height), bg)
    ImageDraw.Draw(img).text((ox - l, oy - t), text, font=font, fill=fg)
    return np.asarray(img, dtype=np.uint8).copy()
