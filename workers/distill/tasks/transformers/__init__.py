"""The transformer tasks (sequence-classification, masked-lm, causal-lm), registered with transformers.

One package for three tasks: they share the tokenisation (`data`), teacher loading and student derivation
(`models`), head fine-tuning (`finetune`) and the save_pretrained artifacts; each task is a small subclass in
`adapters` that sets its targets, metric and loss terms.
"""

from __future__ import annotations

from app.schemas.job_spec import Task
from workers.distill.registry import register_adapter
from workers.distill.tasks.transformers.adapters import (
    CausalLMAdapter,
    MaskedLMAdapter,
    SequenceClassificationAdapter,
)

register_adapter(Task.sequence_classification, SequenceClassificationAdapter)
register_adapter(Task.causal_lm, CausalLMAdapter)
register_adapter(Task.masked_lm, MaskedLMAdapter)
