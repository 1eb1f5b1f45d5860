"""OCR readers (rapidocr PP-OCR ONNX, offline) and a spawn-safe pool of reader processes.

Two readers: recognition only (``dgpo_bench_tasks.ocr_engine.RapidOCRReader``), for
single-line crops such as the nano backbone's 32x128 images, and detection +
recognition (``DetRecReader``) for scenes such as 512x512 SD3 images, where the text
is a small part of the picture. This module imports only numpy at the top so that
worker processes start quickly; onnxruntime sessions are built inside each worker
because they are not fork-safe.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


class Reader(Protocol):
    def read(self, images: Sequence[np.ndarray]) -> list[str]: ...


@dataclass(frozen=True)
class ReaderConfig:
    """How to build one reader; sent to worker processes, so plain fields only."""

    mode: str
    """'rec' (whole image is one text line) or 'det-rec' (find text boxes first)."""
    threads: int = 1
    rec_batch_size: int = 8
    det_limit_side_len: int = 512
    """det-rec: images whose longer side exceeds this are scaled down before detection."""
    text_score: float = 0.5
    """det-rec: recognised boxes below this confidence are dropped (PaddleOCR's drop_score)."""


class DetRecReader:
    """rapidocr detection + recognition; the texts of all boxes, top to bottom, joined."""

    def __init__(self, config: ReaderConfig):
        self.config = config
        self._engine = None

    def _build(self):
        if self._engine is None:
            import logging

            from rapidocr import RapidOCR

            c = self.config
            self._engine = RapidOCR(params={
                "Global.use_cls": False,
                "Global.log_level": "error",
                "Global.text_score": c.text_score,
                "Det.limit_side_len": c.det_limit_side_len,
                "Det.limit_type": "max",
                "Rec.rec_batch_num": c.rec_batch_size,
                "EngineConfig.onnxruntime.intra_op_num_threads": c.threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            })
            logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        return self._engine

    def read(self, images: Sequence[np.ndarray]) -> list[str]:
        engine = self._build()
        texts = []
        for image in images:
            result = engine(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., ::-1]))  # RGB -> BGR
            texts.append("".join(getattr(result, "txts", None) or ()))
        return texts


def make_reader(config: ReaderConfig) -> Reader:
    if config.mode == "rec":
        from dgpo_bench_tasks.ocr_engine import RapidOCRReader

        return RapidOCRReader(num_threads=config.threads, batch_size=config.rec_batch_size)
    if config.mode == "det-rec":
        return DetRecReader(config)
    raise ValueError(f"unknown OCR mode {config.mode!r}")


# --------------------------------------------------------------------------- worker pool

_worker_readers: dict[ReaderConfig, Reader] = {}


def _worker_reader(config: ReaderConfig) -> Reader:
    """In a worker process: each reader is built there on first use and kept."""
    if config not in _worker_readers:
        _worker_readers[config] = make_reader(config)
        _worker_readers[config].read([np.full((32, 128, 3), 255, np.uint8)])  # build the sessions now
    return _worker_readers[config]


def _read_in_worker(config: ReaderConfig, images: np.ndarray) -> list[str]:
    return _worker_reader(config).read(list(images))


def _ping() -> None:
    """A no-op job (the worker has built its reader in the initializer by then)."""


class ReaderPool:
    """``workers`` spawned processes, each with its own readers; ``read`` keeps the order."""

    def __init__(self, workers: int, config: ReaderConfig):
        self.workers = workers
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_reader, initargs=(config,))

    def start(self) -> None:
        """Spawn the workers now rather than during the first batch (one per job without an idle worker)."""
        for f in [self._executor.submit(_ping) for _ in range(self.workers)]:
            f.result()

    def read(self, config: ReaderConfig, images: np.ndarray) -> list[str]:
        chunks = [c for c in np.array_split(images, min(len(images), 2 * self.workers)) if len(c)]
        futures = [self._executor.submit(_read_in_worker, config, c) for c in chunks]
        return [text for f in futures for text in f.result()]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
