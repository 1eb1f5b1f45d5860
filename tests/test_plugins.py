"""Plugin manager, registry semantics and resolution errors (no model is built)."""

import types
import warnings

import pytest

import dgpo_bench
from dgpo_bench.contracts import Reward
from dgpo_bench.errors import (DuplicateComponentError, IncompatibleComponentsError, InvalidOptionsError,
                               PluginLoadError, UnknownComponentError)
from dgpo_bench.plugins import get_plugin_manager, load_components
from dgpo_bench.resolve import build_spec, resolve


class Glow(Reward):
    """A test reward."""

    name = "glow"

    def score(self, images, prompts):
        return images.mean(axis=(1, 2, 3)) / 255.0


def _plugin(name, **hooks):
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, dgpo_bench.hookimpl(fn))
    return mod


def test_first_party_components_are_registered_through_entry_points(components):
    for kind, name in [("backbone", "nano"), ("sampler", "ode-euler"), ("sampler", "flow-sde"),
                       ("objective", "dgpo"), ("objective", "flow-grpo"), ("objective", "diffusion-dpo"),
                       ("reward", "ocr"), ("reward", "compositional")]:
        entry = components.by_kind(kind).entry(name)
        assert entry.version.startswith("dgpo-bench "), (kind, name, entry.version)


def test_duplicate_names_name_both_plugins():
    def reg(register):
        register(Glow)

    pm = get_plugin_manager(load_entrypoints=False,
                            plugins=[_plugin("first", register_rewards=reg), _plugin("second", register_rewards=reg)])
    with pytest.raises(DuplicateComponentError, match="'first' and plugin 'second'|'second' and plugin 'first'"):
        load_components(pm)


def test_unknown_name_lists_available_and_suggests(components):
    with pytest.raises(UnknownComponentError) as info:
        components.objectives.get("dgp")
    msg = str(info.value)
    assert "Did you mean 'dgpo'" in msg and "flow-grpo" in msg and "dgpo-bench plugins" in msg


def test_broken_plugin_is_skipped_with_warning_and_fatal_when_strict():
    def boom(register):
        raise RuntimeError("kaput")

    pm = get_plugin_manager(load_entrypoints=False, plugins=[_plugin("broken", register_rewards=boom)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comps = load_components(pm)
    assert comps.failures[0].plugin == "broken" and "kaput" in comps.failures[0].error
    assert any("broken" in str(w.message) for w in caught)


def test_entry_point_import_failure_is_reported(monkeypatch):
    import importlib.metadata as md

    ep = md.EntryPoint(name="ghost", value="dgpo_bench_no_such_module", group="dgpo_bench")
    monkeypatch.setattr(md, "entry_points", lambda group: [ep])
    with pytest.warns(UserWarning, match="ghost"):
        pm = get_plugin_manager()
    assert pm.dgpo_failures[0].plugin == "ghost"
    with pytest.raises(PluginLoadError, match="ghost"):
        get_plugin_manager(strict=True)


def test_options_reject_unknown_keys_and_bad_types(components):
    dgpo = components.objectives.get("dgpo")
    with pytest.raises(InvalidOptionsError, match="has no option 'not_a_knob'"):
        dgpo.parse_options({"not_a_knob": 1})
    with pytest.raises(InvalidOptionsError, match="Invalid option lr"):
        dgpo.parse_options({"lr": "fast"})


def test_incompatible_pair_is_refused_before_loading(components):
    spec, notes = build_spec(components, {"objective": {"name": "flow-grpo"}, "sampler": {"name": "ode-euler"}})
    with pytest.raises(IncompatibleComponentsError) as info:
        resolve(components, spec, notes)
    msg = str(info.value)
    assert "flow-grpo" in msg and "log_probs" in msg and "--sampler flow-sde" in msg
    # an SDE sampler set up without a stochastic step below int(10 * 0.99) = 9 has nothing to train
    for override in ("sampler.noise_level=0", "sampler.sde_window=[9,10]"):
        spec, notes = build_spec(components, {"objective": {"name": "flow-grpo"}}, [override])
        with pytest.raises(IncompatibleComponentsError, match=r"stochastic steps below 9 of 10, and sampler "
                                                               r"'flow-sde' as set has none; .*timestep_fraction\.$"):
            resolve(components, spec, notes)
    spec, notes = build_spec(components, {"objective": {"name": "flow-grpo"}}, ["sampler.sde_window=[8,10]"])
    assert resolve(components, spec, notes).sampler[1].sde_window == (8, 10)


def test_default_sampler_and_auto_preset(components):
    spec, notes = build_spec(components, {"objective": {"name": "flow-grpo"}})
    resolved = resolve(components, spec, notes)
    assert resolved.sampler[0].name == "flow-sde"
    assert resolved.spec.preset == "flow-grpo-nano"


def test_cli_flags_override_file_and_preset(components, tmp_path):
    spec, _ = build_spec(components, {"group_size": 5, "objective": {"name": "dgpo"}}, ["dgpo.beta_kl=0.5"])
    assert spec.group_size == 5
    assert spec.objective.options["beta_kl"] == 0.5


def test_every_hook_is_documented_for_plugin_authors():
    from pathlib import Path

    from dgpo_bench import hookspecs

    guide = (Path(__file__).resolve().parent.parent / "CONTRIBUTING.md").read_text()
    hooks = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert len(hooks) == 6
    for name in hooks:
        assert f"`{name}`" in guide, f"CONTRIBUTING.md does not mention hook {name}"
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"
