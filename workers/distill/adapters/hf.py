"""Registers the transformer task adapters (sequence-classification, causal-lm, masked-lm)."""

from __future__ import annotations

from app.schemas.job_spec import Task
from workers.distill.adapters import register_adapter
from workers.distill.hf.adapters import CausalLMAdapter, MaskedLMAdapter, SequenceClassificationAdapter

register_adapter(Task.sequence_classification, SequenceClassificationAdapter)
register_adapter(Task.causal_lm, CausalLMAdapter)
register_adapter(Task.masked_lm, MaskedLMAdapter)
