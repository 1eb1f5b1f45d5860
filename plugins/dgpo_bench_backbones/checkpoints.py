"""Checks on weight folders, so a bad path fails with one sentence instead of a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dgpo_bench.errors import DgpoBenchError, MissingWeightsError


class CorruptWeightsError(DgpoBenchError):
    """Weight files that exist but cannot be read or do not fit the model."""


def require_files(folder: Path, files: Sequence[str], what: str, fix: str) -> None:
    """Raise ``MissingWeightsError`` naming the folder or the first files it lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingWeightsError(f"The {what} folder {folder} does not exist; {fix}.")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise MissingWeightsError(f"The {what} folder {folder} is incomplete (missing {', '.join(missing)}); {fix}.")


def corrupt(what: str, path: Path, exc: BaseException) -> CorruptWeightsError:
    """The error for a weight file that exists but fails to load."""
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return CorruptWeightsError(f"The {what} at {path} could not be loaded ({detail}); re-create or re-download it.")


def misfit(what: str, path: Path, exc: RuntimeError) -> CorruptWeightsError:
    """The error for a state dict that torch refuses: names the first tensor that does not fit."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2:
        return corrupt(what, path, exc)
    return CorruptWeightsError(f"The {what} at {path} does not fit this backbone ({lines[1][:200].rstrip('.')}); "
                               "load it with the backbone options it was trained with (for nano: its world).")
