"""Evaluation protocols: zero-shot, few-shot and linear probe, registered by name."""

from __future__ import annotations

from retbench.registry import Registry

PROTOCOLS: Registry = Registry("protocol", entry_point_group="retbench.protocols")

PROTOCOLS.register_lazy("linear_probe", "retbench.protocols.linear_probe:LINEAR_PROBE")
PROTOCOLS.register_lazy("linear_probe.flair", "retbench.protocols.linear_probe:LINEAR_PROBE_FLAIR")
PROTOCOLS.register_lazy("linear_probe.retfound", "retbench.protocols.linear_probe:LINEAR_PROBE_RETFOUND")
PROTOCOLS.register_lazy("few_shot", "retbench.protocols.few_shot:FEW_SHOT")
PROTOCOLS.register_lazy("zero_shot", "retbench.protocols.zero_shot:ZERO_SHOT")
