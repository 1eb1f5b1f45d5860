"""Plugin manager factory and the component registries it fills.

Discovery: entry points of group ``dgpo_bench`` (first-party plugins included), one-off
``.py`` files from ``plugins_dirs``, and plugins passed in. Environment controls:
``DGPO_BENCH_LOAD_PLUGINS`` (comma-separated allow-list of entry-point names; empty
loads none), ``DGPO_BENCH_DISABLE_PLUGINS`` (block-list) and
``DGPO_BENCH_TRACE_PLUGINS=1`` (print every hook call to stderr).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .contracts import Backbone, Objective, Reward, Sampler
from .errors import PluginLoadError
from .registry import Registry

GROUP = "dgpo_bench"


@dataclass
class PluginFailure:
    plugin: str
    error: str


@dataclass
class Preset:
    name: str
    spec: dict[str, Any]
    description: str


@dataclass
class Components:
    """Every registered component kind, with the plugin that provided each."""

    backbones: Registry[type[Backbone]] = field(default_factory=lambda: Registry("backbone", Backbone))
    samplers: Registry[type[Sampler]] = field(default_factory=lambda: Registry("sampler", Sampler))
    objectives: Registry[type[Objective]] = field(default_factory=lambda: Registry("objective", Objective))
    rewards: Registry[type[Reward]] = field(default_factory=lambda: Registry("reward", Reward))
    presets: Registry[Preset] = field(default_factory=lambda: Registry("preset"))
    failures: list[PluginFailure] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def by_kind(self, kind: str) -> Registry:
        return {"backbone": self.backbones, "sampler": self.samplers, "objective": self.objectives,
                "reward": self.rewards, "preset": self.presets}[kind]


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    return None if raw is None else [p.strip() for p in raw.split(",") if p.strip()]


def plugins_dirs_from_env() -> list[Path]:
    """Folders of one-off plugin files named by ``DGPO_BENCH_PLUGINS_DIR`` (os.pathsep-separated)."""
    return [Path(p) for p in os.environ.get("DGPO_BENCH_PLUGINS_DIR", "").split(os.pathsep) if p]


def get_plugin_manager(*, load_entrypoints: bool = True, plugins: Iterable[object] = (),
                       plugins_dirs: Iterable[Path] = (), strict: bool = False) -> pluggy.PluginManager:
    """A fresh plugin manager; failed plugins are recorded in ``pm.dgpo_failures``.

    With ``strict`` a plugin that fails to import raises ``PluginLoadError``;
    otherwise it is reported with a warning and skipped.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm.dgpo_failures = []  # type: ignore[attr-defined]
    pm.dgpo_versions = {}  # type: ignore[attr-defined]

    def fail(plugin: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        if strict:
            raise PluginLoadError(f"Plugin '{plugin}' failed to load ({msg}); fix or uninstall it.") from exc
        warnings.warn(f"dgpo-bench plugin '{plugin}' failed to load and was skipped: {msg}", stacklevel=2)
        pm.dgpo_failures.append(PluginFailure(plugin, msg))  # type: ignore[attr-defined]

    blocked = set(_env_list("DGPO_BENCH_DISABLE_PLUGINS") or [])
    for name in blocked:
        pm.set_blocked(name)
    if load_entrypoints:
        allow = _env_list("DGPO_BENCH_LOAD_PLUGINS")
        for ep in importlib.metadata.entry_points(group=GROUP):
            if ep.name in blocked or (allow is not None and ep.name not in allow) or pm.is_registered(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not take down the CLI
                fail(ep.name, exc)
                continue
            dist = ep.dist
            pm.dgpo_versions[ep.name] = f"{dist.name} {dist.version}" if dist else ""  # type: ignore[attr-defined]
    for directory in plugins_dirs:
        for path in sorted(Path(directory).glob("*.py")):
            name = f"dir:{path.stem}"
            try:
                spec = importlib.util.spec_from_file_location(f"dgpo_bench_local_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                spec.loader.exec_module(module)  # type: ignore[union-attr]
                pm.register(module, name=name)
                pm.dgpo_versions[name] = str(path)  # type: ignore[attr-defined]
            except Exception as exc:
                fail(name, exc)
    for plugin in plugins:
        pm.register(plugin, name=getattr(plugin, "__name__", None))
    pm.check_pending()
    if os.environ.get("DGPO_BENCH_TRACE_PLUGINS") == "1":
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()
    return pm


def load_components(pm: pluggy.PluginManager) -> Components:
    """Call every ``register_*`` hook, binding ``register`` to each implementing plugin."""
    comps = Components(failures=list(getattr(pm, "dgpo_failures", [])),
                       versions=dict(getattr(pm, "dgpo_versions", {})))
    for kind, hook_name in (("backbone", "register_backbones"), ("sampler", "register_samplers"),
                            ("objective", "register_objectives"), ("reward", "register_rewards")):
        registry = comps.by_kind(kind)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            version = comps.versions.get(impl.plugin_name, "")

            def register(cls: type, _plugin: str = impl.plugin_name, _version: str = version,
                         _registry: Registry = registry) -> None:
                _registry.add(getattr(cls, "name", ""), cls, _plugin, _version, cls.summary()
                              if hasattr(cls, "summary") else "", tuple(getattr(cls, "aliases", ())))

            _call_registration(impl, register, comps)
    for impl in pm.hook.register_presets.get_hookimpls():
        version = comps.versions.get(impl.plugin_name, "")

        def register_preset(name: str, spec: dict[str, Any], description: str = "",
                            _plugin: str = impl.plugin_name, _version: str = version) -> None:
            comps.presets.add(name, Preset(name, spec, description), _plugin, _version, description)

        _call_registration(impl, register_preset, comps)
    return comps


def _call_registration(impl: Any, register: Any, comps: Components) -> None:
    """Run one plugin's registration hook; a crash there skips the plugin, not the CLI."""
    from .errors import DgpoBenchError

    try:
        impl.function(register=register)
    except DgpoBenchError:
        raise
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"dgpo-bench plugin '{impl.plugin_name}' failed to register and was skipped: {msg}",
                      stacklevel=2)
        comps.failures.append(PluginFailure(impl.plugin_name, msg))
