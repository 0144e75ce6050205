"""Evaluation protocols, registered by name: zero-shot, few-shot and linear probe for classification
tasks; retrieval (``retrieval.*``) and closed-form VQA (``vqa.*``) protocols for those kinds of task.

A protocol evaluates tasks of one ``kind`` (its attribute; classification when absent)."""

from __future__ import annotations

from retbench.registry import Registry

PROTOCOLS: Registry = Registry("protocol", entry_point_group="retbench.protocols")

PROTOCOLS.register_lazy("linear_probe", "retbench.protocols.linear_probe:LINEAR_PROBE")
PROTOCOLS.register_lazy("linear_probe.flair", "retbench.protocols.linear_probe:LINEAR_PROBE_FLAIR")
PROTOCOLS.register_lazy("linear_probe.flair_grouped", "retbench.protocols.linear_probe:LINEAR_PROBE_FLAIR_GROUPED")
PROTOCOLS.register_lazy("linear_probe.retfound", "retbench.protocols.linear_probe:LINEAR_PROBE_RETFOUND")
PROTOCOLS.register_lazy("few_shot", "retbench.protocols.few_shot:FEW_SHOT")
PROTOCOLS.register_lazy("zero_shot", "retbench.protocols.zero_shot:ZERO_SHOT")
PROTOCOLS.register_lazy("retrieval.zero_shot", "retbench.protocols.retrieval:RETRIEVAL_ZERO_SHOT")
PROTOCOLS.register_lazy("retrieval.linear_map", "retbench.protocols.retrieval:RETRIEVAL_LINEAR_MAP")
PROTOCOLS.register_lazy("vqa.zero_shot", "retbench.protocols.vqa:VQA_ZERO_SHOT")
PROTOCOLS.register_lazy("vqa.probe", "retbench.protocols.vqa:VQA_PROBE")
