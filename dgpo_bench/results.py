"""Run directory format: atomic writes while running, loading for ``compare``.

A run directory holds ``spec.resolved.json`` (enough to re-run), ``metrics.jsonl``
(train and eval records with cumulative cost), ``result.json`` (written last, so its
presence marks a finished run), ``samples/*.png`` and ``weights/``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import SpecError

SPEC_FILE, METRICS_FILE, RESULT_FILE = "spec.resolved.json", "metrics.jsonl", "result.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename over it. The file is
    created as a plain ``open`` would create it (mode 0o666 less the umask; mkstemp's is 0o600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replaced_atomically(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder`` to fill; when the block succeeds it replaces
    ``folder`` by renames, when it fails it is deleted and ``folder`` is left as it was."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a single line and flush it to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=_jsonable) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _wrap(text: str, width: int, max_lines: int = 4) -> list[str]:
    """A caption in at most ``max_lines`` lines of ``width`` characters ('…' when cut)."""
    import textwrap

    lines = textwrap.wrap(text, width, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1] + "…"
    return lines


def save_grid(path: Path, images: np.ndarray, captions: list[str] | None = None, cols: int = 4) -> None:
    """Tile uint8 images (B, H, W, 3) into one PNG, optionally captioned."""
    from PIL import Image, ImageDraw

    b, h, w, _ = images.shape
    cols = max(1, min(cols, b))
    rows = (b + cols - 1) // cols
    lines = [_wrap(c, max(4, w // 6)) for c in captions] if captions else []
    cap_h = 11 * max(map(len, lines)) + 1 if lines else 0
    pad = 2
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        r, c = divmod(i, cols)
        x, y = pad + c * (w + pad), pad + r * (h + cap_h + pad)
        canvas.paste(Image.fromarray(images[i]), (x, y))
        if captions:
            draw.multiline_text((x, y + h), "\n".join(lines[i]), fill="black", spacing=1)
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- provenance


def git_revision(cwd: Path | None = None) -> str | None:
    """The git revision of the dgpo-bench checkout (with '-dirty' when modified)."""
    root = cwd or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's name, family and model, and whether it computes bf16 natively: backbones turn
    bf16 autocast on where it does, so the same seed gives different numbers on CPUs that
    differ there. ``cpuinfo`` is /proc/cpuinfo's text (None: this machine's, parsed once)."""
    if cpuinfo is None:
        return dict(_this_cpu())
    first = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    first = {k.strip(): v.strip() for k, v in first.items()}
    flags = set(first.get("flags", "").split())
    return {"name": first.get("model name") or platform.processor() or None,
            "family": first.get("cpu family"), "model": first.get("model"),
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"})}


@functools.lru_cache(maxsize=1)
def _this_cpu() -> dict[str, Any]:
    """This machine's ``cpu_info``, read and parsed once (backbones ask on every forward); without
    /proc/cpuinfo, family and model are None and bf16 counts as not native."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return cpu_info(text)


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for dist in ("dgpo-bench", "torch", "diffusers", "transformers", "accelerate", "peft", "rapidocr",
                 "onnxruntime", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_revision": git_revision(),
    }


# --------------------------------------------------------------------------- loading


@dataclass
class RunRecord:
    """A finished run as ``compare`` sees it."""

    path: Path
    result: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def spec(self) -> dict[str, Any]:
        return self.result["spec"]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("type") == "eval"]


def load_run(path: Path) -> RunRecord:
    result_path = path / RESULT_FILE
    if not result_path.is_file():
        raise SpecError(f"{path} has no {RESULT_FILE}: the run did not finish; rerun or resume it.")
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{result_path} is corrupt ({exc}); delete the run directory and rerun it.") from None
    mpath = path / METRICS_FILE
    return RunRecord(path, result, read_jsonl(mpath) if mpath.is_file() else [])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, skipping blank lines and one cut short by a crash or
    by a run still writing it."""
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def unfinished_runs(paths: list[Path]) -> list[Path]:
    """Run directories under ``paths`` with a spec but no result (running, interrupted or failed)."""
    return sorted(s.parent for p in paths if p.is_dir() for s in p.rglob(SPEC_FILE)
                  if not (s.parent / RESULT_FILE).is_file())


def find_runs(paths: list[Path]) -> list[RunRecord]:
    """Finished runs under ``paths`` (each a run directory or a folder of them)."""
    runs: list[RunRecord] = []
    for p in paths:
        if not p.exists():
            raise SpecError(f"{p} does not exist; pass run directories or a suite directory.")
        if (p / RESULT_FILE).is_file():
            runs.append(load_run(p))
        else:
            runs += [load_run(r.parent) for r in sorted(p.rglob(RESULT_FILE))]
    if not runs:
        raise SpecError(f"No finished runs (directories with {RESULT_FILE}) under {', '.join(map(str, paths))}.")
    return runs
