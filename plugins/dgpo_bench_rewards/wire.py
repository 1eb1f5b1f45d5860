"""The reward server's wire format: JSON bodies, images as base64 PNG (lossless; no pickle)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Sequence

import numpy as np

from dgpo_bench.contracts import Prompt
from dgpo_bench.errors import RewardError


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"an image is {img.format}, not PNG")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def encode_batch(images: np.ndarray, prompts: Sequence[Prompt]) -> bytes:
    try:
        return json.dumps({
            "images": [base64.b64encode(png_bytes(im)).decode("ascii") for im in images],
            "prompts": [{"text": p.text, "metadata": p.metadata} for p in prompts],
        }).encode()
    except TypeError as exc:
        raise RewardError(f"Prompt metadata must be JSON-serialisable to reach a reward server ({exc}).") from None


def decode_batch(body: bytes) -> tuple[np.ndarray, list[Prompt]]:
    """Inverse of ``encode_batch``; ValueError on anything malformed."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("prompts"), list):
        raise ValueError("the body must be a JSON object with lists 'images' and 'prompts'")
    images = [png_image(base64.b64decode(s, validate=True)) for s in data["images"]]
    if len({im.shape for im in images}) > 1:
        raise ValueError("all images of a batch must have the same size")
    prompts = [prompt_from_json(p) for p in data["prompts"]]
    array = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    return array, prompts


def prompt_from_json(item: Any) -> Prompt:
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise ValueError("each prompt must be an object with a string 'text'")
    return Prompt(item["text"], dict(item.get("metadata") or {}))
