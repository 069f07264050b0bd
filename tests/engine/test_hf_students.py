"""Transformer students: size within tolerance of the target, initialised from teacher layers, reloadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from workers.distill.contract import EngineError
from workers.distill.tasks.transformers.models import (
    build_hf_student,
    count_parameters,
    initialise_from_teacher,
    layer_map,
    plan_student,
)

torch.set_num_threads(1)


def _tiny_teachers() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        BertForSequenceClassification(
            BertConfig(
                vocab_size=400,
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
                num_labels=3,
            )
        ),
        RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=400,
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
            )
        ),
        GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=64, n_layer=4, n_head=4, n_positions=64)),
    ]


@pytest.mark.parametrize("compression", [0.15, 0.3, 0.5, 0.75])
def test_student_size_within_25_percent_of_target(compression: float) -> None:
    for teacher in _tiny_teachers():
        student = build_hf_student(teacher, compression, seed=0)
        ratio = count_parameters(student) / count_parameters(teacher)
        assert abs(ratio - compression) / compression <= 0.25, (type(teacher).__name__, compression, ratio)
        assert type(student) is type(teacher)
        config = student.config
        assert config.hidden_size % config.num_attention_heads == 0
        assert config.vocab_size == teacher.config.vocab_size  # shares the tokenizer


@pytest.mark.parametrize("compression", [0.05, 0.1, 0.25, 0.5])
def test_bert_large_plan_scales_depth_and_width(compression: float) -> None:
    with torch.device("meta"):  # the real bert-large shape, no memory
        teacher = BertForSequenceClassification(
            BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        )
    config, student_params, teacher_params = plan_student(teacher, compression)
    assert abs(student_params / teacher_params - compression) / compression <= 0.25
    assert config.num_hidden_layers < 24 or config.hidden_size < 1024
    assert config.hidden_size % config.num_attention_heads == 0
    if compression >= 0.25:  # enough budget to keep the teacher's width: DistilBERT-style layer dropping
        assert config.hidden_size == 1024


def test_unreachable_target_is_a_clear_error() -> None:
    teacher = _tiny_teachers()[0]
    with pytest.raises(EngineError, match="out of reach") as info:
        build_hf_student(teacher, 0.001, seed=0)
    assert info.value.code == "unsupported"


def test_student_layers_are_copied_from_every_other_teacher_layer() -> None:
    teacher = _tiny_teachers()[0]
    student = build_hf_student(teacher, 0.6, seed=0)  # same width, 2 of 4 layers
    assert student.config.hidden_size == 64 and student.config.num_hidden_layers == 2
    assert layer_map(2, 4) == {0: 0, 1: 2}
    for s_index, t_index in layer_map(2, 4).items():
        s_layer = student.bert.encoder.layer[s_index].attention.self.query.weight
        t_layer = teacher.bert.encoder.layer[t_index].attention.self.query.weight
        assert torch.equal(s_layer, t_layer)
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight
    )


def test_narrower_student_takes_leading_slices() -> None:
    teacher = _tiny_teachers()[0]
    student = build_hf_student(teacher, 0.15, seed=0)
    hidden = student.config.hidden_size
    assert hidden < 64
    embeddings = teacher.bert.embeddings.word_embeddings.weight[:, :hidden]
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, embeddings)
    counts = initialise_from_teacher(student, teacher)
    assert counts["sliced"] > 0 and counts["random"] == 0


def test_gpt2_student_saves_and_reloads_with_transformers(tmp_path: Path) -> None:
    teacher = _tiny_teachers()[2]
    student = build_hf_student(teacher, 0.4, seed=0).eval()
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, reloaded(ids).logits, atol=1e-6)
