"""Recognition-only OCR reader (rapidocr PP-OCR ONNX, weights ship in the wheel).

Detection and angle classification are disabled: the worlds render a single line
of text that fills the canvas, so the recogniser reads the whole image directly
(about 100x cheaper than det+rec and with the same ceiling).
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np


class RapidOCRReader:
    """Lazily built rapidocr reader. ``read(images) -> list[str]``.

    images: a sequence of uint8 HxWx3 RGB arrays (or one BxHxWx3 array).
    """

    def __init__(self, num_threads: int = 2, batch_size: int = 32):
        self.num_threads = int(num_threads)
        self.batch_size = int(batch_size)
        self._engine = None
        self._rec = None
        self._lock = threading.Lock()

    def _build(self):
        if self._rec is not None:
            return
        with self._lock:
            if self._rec is not None:
                return
            import logging

            from rapidocr import RapidOCR

            params = {
                "Global.use_det": False,
                "Global.use_cls": False,
                "Global.use_rec": True,
                "Global.log_level": "error",
                "EngineConfig.onnxruntime.intra_op_num_threads": self.num_threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                "Rec.rec_batch_num": self.batch_size,
            }
            try:
                eng = RapidOCR(params=params)
            except Exception:  # older/newer config keys: fall back to the essentials
                params.pop("Global.log_level", None)
                eng = RapidOCR(params=params)
            logging.getLogger("RapidOCR").setLevel(logging.ERROR)
            self._engine = eng
            self._rec = eng._load_rec_model()

    def read(self, images: Sequence[np.ndarray] | np.ndarray) -> list[str]:
        self._build()
        from rapidocr.ch_ppocr_rec import TextRecInput

        imgs = [np.ascontiguousarray(np.asarray(im, dtype=np.uint8)) for im in images]
        if not imgs:
            return []
        # rapidocr expects BGR (cv2 convention)
        imgs = [im[..., ::-1].copy() if im.ndim == 3 else im for im in imgs]
        out = self._rec(TextRecInput(img=imgs))
        txts = list(out.txts) if out.txts is not None else [""] * len(imgs)
        return [str(t) for t in txts]

    __call__ = read
