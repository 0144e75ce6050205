"""Evaluation protocols, registered by name: zero-shot, few-shot and linear probe for classification
tasks, and fine-tuning (``finetune*``, opt-in: run only when asked for by name);
retrieval (``retrieval.*``) and closed-form VQA (``vqa.*``) protocols for those kinds of task.

Every entry satisfies :class:`retbench.protocols.base.EvaluationProtocol` (its ``kind`` says which
tasks it evaluates); third-party packages add protocols through the entry-point group
``retbench.protocols``, held to the same contract."""

from __future__ import annotations

from typing import TYPE_CHECKING

from retbench.registry import Registry

if TYPE_CHECKING:
    from retbench.protocols.base import EvaluationProtocol

PROTOCOLS: Registry[EvaluationProtocol] = Registry("protocol", entry_point_group="retbench.protocols",
                                                   contract="retbench.protocols.base:PROTOCOL_CONTRACT")

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
PROTOCOLS.register_lazy("finetune", "retbench.protocols.finetune:FINETUNE")
PROTOCOLS.register_lazy("finetune.head", "retbench.protocols.finetune:FINETUNE_HEAD")
PROTOCOLS.register_lazy("finetune.lora", "retbench.protocols.finetune:FINETUNE_LORA")
