"""One generic name -> class registry, with provenance and suggestions for typos."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

from .errors import DuplicateComponentError, PluginLoadError, UnknownComponentError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    plugin: str
    version: str
    description: str = ""


class Registry(Generic[T]):
    """Named entries of one kind; duplicate names are errors naming both plugins."""

    def __init__(self, kind: str, base: type | None = None):
        self.kind, self.base = kind, base
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, obj: T, plugin: str, version: str = "", description: str = "",
            aliases: tuple[str, ...] = ()) -> None:
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise PluginLoadError(
                f"Plugin '{plugin}' registered {obj!r} as a {self.kind}, but it is not a "
                f"subclass of {self.base.__name__}; subclass it."
            )
        if not _NAME.match(name):
            raise PluginLoadError(
                f"Plugin '{plugin}' registered the {self.kind} name {name!r}; names must be "
                "kebab-case (lower-case letters, digits and dashes)."
            )
        for key in (name, *aliases):
            owner = self._entries.get(self._aliases.get(key, key))
            if owner is not None:
                raise DuplicateComponentError(
                    f"The {self.kind} name '{key}' is registered by both plugin '{owner.plugin}' "
                    f"and plugin '{plugin}'; uninstall or disable one of them "
                    "(DGPO_BENCH_DISABLE_PLUGINS)."
                )
        self._entries[name] = Entry(name, obj, plugin, version, description)
        for alias in aliases:
            self._aliases[alias] = name

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise UnknownComponentError(self.kind, name, list(self._entries))
        return self._entries[key]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return self._aliases.get(name, name) in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)
