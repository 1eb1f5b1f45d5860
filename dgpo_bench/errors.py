"""User-facing errors: each carries one sentence naming the problem and the fix."""

from __future__ import annotations

import difflib


class DgpoBenchError(Exception):
    """Base of every error the CLI reports as a sentence with exit code 2."""


class UnknownComponentError(DgpoBenchError, KeyError):
    """A component name that no loaded plugin registers."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, sorted(available)
        self.suggestions = difflib.get_close_matches(name, self.available, n=3, cutoff=0.5)
        super().__init__(str(self))

    def __str__(self) -> str:
        hint = f" Did you mean {' or '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        avail = ", ".join(self.available) or "none"
        return (
            f"Unknown {self.kind} '{self.name}'.{hint} Available: {avail}; "
            "is the plugin that provides it installed? See 'dgpo-bench plugins'."
        )


class DuplicateComponentError(DgpoBenchError):
    """Two plugins register the same name for one kind."""


class IncompatibleComponentsError(DgpoBenchError):
    """A pairing of components that cannot work together (checked before loading)."""


class InvalidOptionsError(DgpoBenchError):
    """Options that a component's schema rejects."""


class PluginLoadError(DgpoBenchError):
    """A plugin entry point that failed to import or register."""


class SpecError(DgpoBenchError):
    """A run or suite specification that cannot be used."""


class MissingWeightsError(DgpoBenchError):
    """Model weights that are not on disk where the user said they would be."""


class RewardError(DgpoBenchError):
    """A reward that failed to score a batch."""


class TrainingDivergedError(DgpoBenchError):
    """A non-finite loss or gradient during training."""


class SuiteError(DgpoBenchError):
    """Cells of a suite that failed while the other cells ran."""


class ObjectiveContractError(DgpoBenchError):
    """An objective plugin that breaks the update rules the engine enforces."""
