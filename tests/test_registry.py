"""The generic Registry: register, lazy entries, entry points, globbing, suggestions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

import retbench.registry as registry_module
from retbench.errors import RetbenchError, UnknownNameError
from retbench.registry import Contract, Registry


def test_register_bare_and_as_decorator() -> None:
    reg: Registry = Registry("widget")
    obj = object()
    assert reg.register("plain", obj) is obj

    @reg.register("decorated")
    def make() -> int:
        return 7

    assert make() == 7  # the decorator returns the function itself
    assert reg.get("plain") is obj and reg.get("decorated") is make
    assert "plain" in reg and "missing" not in reg
    assert len(reg) == 2 and list(reg) == ["decorated", "plain"]


def test_duplicate_name_is_refused_but_same_object_is_fine() -> None:
    reg: Registry = Registry("widget")
    obj = object()
    reg.register("a", obj)
    reg.register("a", obj)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", object())


def test_lazy_entry_is_imported_on_first_get() -> None:
    reg: Registry = Registry("widget")
    reg.register_lazy("sqrt", "math:sqrt")
    assert reg._items["sqrt"] == "math:sqrt"  # nothing imported yet
    assert reg.get("sqrt") is math.sqrt
    assert reg._items["sqrt"] is math.sqrt  # resolved once, then kept
    with pytest.raises(ValueError, match="module:Attr"):
        reg.register_lazy("bad", "math.sqrt")


def test_real_object_replaces_a_lazy_entry() -> None:
    reg: Registry = Registry("widget")
    reg.register_lazy("x", "math:pi")
    reg.register("x", 3)
    assert reg.get("x") == 3


def test_entry_points_are_loaded_and_do_not_override(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = []

    def fake_entry_points(group: str) -> list:
        groups.append(group)
        return [SimpleNamespace(name="ep_pi", value="math:pi"), SimpleNamespace(name="own", value="math:e")]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    reg: Registry = Registry("widget", entry_point_group="retbench.widgets")
    reg.register("own", 42)
    assert reg.get("ep_pi") == math.pi
    assert reg.get("own") == 42
    assert reg.names() == ["ep_pi", "own"]
    assert groups == ["retbench.widgets"]  # loaded once


def test_glob_names() -> None:
    reg: Registry = Registry("model")
    for name in ("vit_small.a", "vit_base.b", "resnet18", "vit_small.c"):
        reg.register(name, name.upper())
    assert reg.names("vit_small*") == ["vit_small.a", "vit_small.c"]
    assert reg.names("vit_*") == ["vit_base.b", "vit_small.a", "vit_small.c"]
    assert reg.names("*18") == ["resnet18"]
    assert reg.names("nothing*") == []
    assert reg.names() == sorted(reg.names())


def test_unknown_name_suggests_close_matches() -> None:
    reg: Registry = Registry("protocol")
    for name in ("linear_probe", "linear_probe.flair", "few_shot", "zero_shot"):
        reg.register(name, name)
    with pytest.raises(UnknownNameError) as info:
        reg.get("linear_prob")
    err = info.value
    assert isinstance(err, RetbenchError) and isinstance(err, KeyError)
    msg = str(err)
    assert msg.startswith("unknown protocol 'linear_prob'; did you mean 'linear_probe'")
    assert "'zero_shot'" not in msg
    assert "retbench list protocols" in msg
    assert not msg.startswith('"')  # not KeyError's quoted repr


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    reg: Registry = Registry("metric")
    reg.register("accuracy", 1)
    msg = reg.unknown_message("zzzzzz")
    assert "did you mean" not in msg
    assert msg == "unknown metric 'zzzzzz' (see `retbench list metrics`)"


def test_shipped_registries_hold_their_entries() -> None:
    from retbench.adapters import ADAPTERS, discover_adapters
    from retbench.data.sources import SOURCES
    from retbench.protocols import PROTOCOLS

    discover_adapters()
    assert {"classical", "tinyclip", "timm"} <= set(ADAPTERS.names())
    assert PROTOCOLS.names("linear_probe*") == ["linear_probe", "linear_probe.flair", "linear_probe.flair_grouped",
                                                 "linear_probe.retfound"]
    assert PROTOCOLS.get("few_shot").name == "few_shot"
    assert SOURCES.names() == ["csv", "folder", "hf_disk", "npz"]
    with pytest.raises(UnknownNameError, match="did you mean 'tinyclip'"):
        ADAPTERS.get("tinyclp")


# ---------------------------------------------------------------- contracts


def _protocol(**overrides):
    """A minimal object satisfying the protocol contract, with members replaced or (None) removed."""
    members = {"name": "mine", "description": "d", "kind": "classification", "run_options": frozenset(),
               "needs_text": lambda spec: False, "metric_names": lambda spec: spec.metrics,
               "with_options": lambda shots=None, seeds=None: None, "run": lambda ctx: None}
    members.update(overrides)
    return SimpleNamespace(**{k: v for k, v in members.items() if v is not None})


def test_generic_contract_names_the_entry_and_the_missing_member() -> None:
    reg: Registry = Registry("widget", contract=Contract("my.Widget", members=("size",), methods=("spin",)))
    reg.register("good", SimpleNamespace(size=1, spin=lambda: 0))
    with pytest.raises(RetbenchError) as info:
        reg.register("bad", SimpleNamespace(size=1))
    assert str(info.value) == "widget 'bad' does not satisfy the widget contract my.Widget: it has no member 'spin'"
    with pytest.raises(RetbenchError, match="its member 'spin' is not callable"):
        reg.register("stiff", SimpleNamespace(size=1, spin=3))
    assert reg.names() == ["good"]  # refused entries are not registered


def test_protocol_registry_refuses_entries_that_break_the_contract() -> None:
    from retbench.protocols.base import PROTOCOL_CONTRACT

    reg: Registry = Registry("protocol", contract="retbench.protocols.base:PROTOCOL_CONTRACT")
    assert reg.contract is PROTOCOL_CONTRACT  # the lazy "module:Attr" contract is imported on first use
    assert set(PROTOCOL_CONTRACT.members) == {"name", "description", "kind", "run_options"}
    assert set(PROTOCOL_CONTRACT.methods) == {"needs_text", "metric_names", "with_options", "run"}
    reg.register("ok", _protocol())
    cases = {
        "no_run": (_protocol(run=None), "it has no member 'run'"),
        "no_kind": (_protocol(kind=None), "it has no member 'kind'"),
        "bad_kind": (_protocol(kind="segmentation"), "its kind 'segmentation' is none of classification, retrieval, vqa"),
        "bad_options": (_protocol(run_options=frozenset({"epochs"})), "run_options"),
        "flag_not_method": (_protocol(needs_text=True), "its member 'needs_text' is not callable"),
    }
    for name, (entry, words) in cases.items():
        with pytest.raises(RetbenchError) as info:
            reg.register(name, entry)
        msg = str(info.value)
        assert msg.startswith(f"protocol '{name}' does not satisfy the protocol contract "
                              "retbench.protocols.base.EvaluationProtocol: ") and words in msg and "\n" not in msg, msg

    class Proto:  # a class is no protocol: register an instance
        name, description, kind, run_options = "c", "d", "classification", frozenset()

    with pytest.raises(RetbenchError, match="it is a class, not an instance"):
        reg.register("a_class", Proto)


def test_entry_point_protocols_are_checked_when_first_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    module = types.ModuleType("third_party_protocols")
    module.GOOD = _protocol(name="good")  # type: ignore[attr-defined]
    module.NO_RUN = _protocol(name="no_run", run=None)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "third_party_protocols", module)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [
        SimpleNamespace(name="good", value="third_party_protocols:GOOD"),
        SimpleNamespace(name="no_run", value="third_party_protocols:NO_RUN")])
    reg: Registry = Registry("protocol", entry_point_group="retbench.protocols",
                             contract="retbench.protocols.base:PROTOCOL_CONTRACT")
    assert reg.names() == ["good", "no_run"]  # listed without importing
    assert reg.get("good") is module.GOOD
    with pytest.raises(RetbenchError) as info:
        reg.get("no_run")
    assert str(info.value) == ("protocol 'no_run' (third_party_protocols:NO_RUN) does not satisfy the protocol contract "
                               "retbench.protocols.base.EvaluationProtocol: it has no member 'run'")
    with pytest.raises(RetbenchError, match="no member 'run'"):  # still refused: not cached
        reg.get("no_run")


def test_shipped_protocols_adapters_and_metrics_satisfy_their_contracts() -> None:
    from retbench.adapters import ADAPTERS, Adapter, discover_adapters
    from retbench.metrics import METRICS
    from retbench.protocols import PROTOCOLS
    from retbench.protocols.base import EvaluationProtocol

    for name in PROTOCOLS.names():
        proto = PROTOCOLS.get(name)
        assert isinstance(proto, EvaluationProtocol) and proto.name == name
    discover_adapters()
    assert all(issubclass(ADAPTERS.get(n), Adapter) for n in ADAPTERS.names())
    assert len(METRICS.names()) > 10 and all(METRICS.get(n).name == n for n in METRICS.names())
    with pytest.raises(RetbenchError, match="model 'not_an_adapter' does not satisfy the model contract "
                                            "retbench.adapters.Adapter: it is not a subclass of retbench.adapters.Adapter"):
        ADAPTERS.register("not_an_adapter", object)
    with pytest.raises(RetbenchError, match="metric 'half' does not satisfy the metric contract retbench.metrics.Metric: "
                                            "it is a function, not an instance of retbench.metrics.Metric"):
        METRICS.register("half", lambda y, p: 0.5)
    assert "not_an_adapter" not in ADAPTERS and "half" not in METRICS
