"""``ocr``: text-rendering accuracy read by a real OCR engine, scored as in Flow-GRPO."""

from __future__ import annotations

import os
import re
from concurrent.futures.process import BrokenProcessPool
from typing import ClassVar, Literal, Sequence

import numpy as np
from pydantic import Field

from dgpo_bench.contracts import LoadContext, Options, Prompt, Reward
from dgpo_bench.errors import RewardError

from .ocr_engines import ReaderConfig, ReaderPool, make_reader
from .prompt_sets import world_prompts
from .scores import checked_images, checked_scores

_QUOTED = re.compile(r'"([^"]*)"')


def ocr_target(prompt: Prompt) -> str:
    """The text the image must show: the first quoted span of the prompt, else ``metadata['target']``."""
    match = _QUOTED.search(prompt.text)
    if match:
        return match.group(1)
    if isinstance(prompt.metadata.get("target"), str):
        return prompt.metadata["target"]
    raise RewardError(f"Prompt {prompt.text!r} has no quoted text, so the ocr reward has no target; "
                      'use text-rendering prompts such as \'a sign that says "hello"\'.')


class OcrOptions(Options):
    mode: Literal["auto", "rec", "det-rec"] = "auto"
    """'rec' reads the whole image as one line; 'det-rec' detects text boxes first;
    'auto' uses 'rec' when the image's shorter side is at most ``rec_max_side`` pixels."""
    rec_max_side: int = Field(64, ge=1)
    workers: int | None = Field(None, ge=0)
    """Reader processes (spawned); 0 reads in this process. None: in this process for 'rec'
    crops (about 30 ms of CPU each, where a pool adds only start-up), two processes for
    'det-rec' images (110-150 ms each at 512x512); see benchmarks/results/ocr_throughput.md."""
    threads: int = Field(1, ge=1)
    """onnxruntime intra-op threads per reader."""
    rec_batch_size: int = Field(8, ge=1)
    det_limit_side_len: int = Field(512, ge=32)
    """det-rec: images whose longer side exceeds this are scaled down for detection (recognition
    reads full-resolution crops); 512 keeps SD3 512x512 outputs at native size."""


class OcrReward(Reward):
    """OCR accuracy of the quoted text: 1 if read as a substring, else 1 - edit distance / length."""

    name = "ocr"
    world = "text"
    Options = OcrOptions
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __init__(self, options=None):
        super().__init__(options)
        self._readers: dict[str, object] = {}
        self._pool: ReaderPool | None = None

    def _config(self, mode: str) -> ReaderConfig:
        o = self.options
        return ReaderConfig(mode=mode, threads=o.threads, rec_batch_size=o.rec_batch_size,
                            det_limit_side_len=o.det_limit_side_len)

    def workers_for(self, mode: str) -> int:
        if self.options.workers is not None:
            return self.options.workers
        return 0 if mode == "rec" else min(2, os.cpu_count() or 1)

    def load(self, ctx: LoadContext) -> None:
        """Build the reader (or start the pool) for the mode expected; 'auto' expects small crops."""
        first = "det-rec" if self.options.mode == "det-rec" else "rec"
        if self.workers_for(first):
            self._start_pool(first)
        else:
            self._reader(first).read([np.full((32, 128, 3), 255, np.uint8)])  # build the sessions now

    def _start_pool(self, mode: str) -> ReaderPool:
        if self._pool is None:
            self._pool = ReaderPool(self.workers_for(mode), self._config(mode))
            self._pool.start()
        return self._pool

    def _reader(self, mode: str):
        if mode not in self._readers:
            self._readers[mode] = make_reader(self._config(mode))
        return self._readers[mode]

    def mode_for(self, height: int, width: int) -> str:
        if self.options.mode != "auto":
            return self.options.mode
        return "rec" if min(height, width) <= self.options.rec_max_side else "det-rec"

    def read(self, images: np.ndarray) -> list[str]:
        """The recognised text of each image."""
        if len(images) == 0:
            return []
        mode = self.mode_for(*images.shape[1:3])
        try:
            if self.workers_for(mode):
                texts = self._start_pool(mode).read(self._config(mode), images)
            else:
                texts = self._reader(mode).read(list(images))
        except BrokenProcessPool:
            raise RewardError("An OCR worker process died (killed or out of memory); "
                              "rebuild the reward or use fewer workers.") from None
        except Exception as exc:
            raise RewardError(f"The OCR engine failed on a batch of {len(images)} images "
                              f"({type(exc).__name__}: {exc}).") from exc
        if len(texts) != len(images):
            raise RewardError(f"The OCR engine returned {len(texts)} texts for {len(images)} images.")
        return texts

    def score(self, images: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
        from dgpo_bench_tasks.text import ocr_similarity

        images = checked_images(self.name, images, prompts)
        targets = [ocr_target(p) for p in prompts]
        texts = self.read(images)
        return checked_scores(self.name, [ocr_similarity(t, g) for t, g in zip(texts, targets)], len(images))

    def prompts(self, split: str) -> list[Prompt]:
        return world_prompts(self.world, split)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._readers.clear()
