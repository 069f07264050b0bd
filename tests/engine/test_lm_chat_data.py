"""Chat and instruction data for causal-lm: rendered with the chat template, loss on assistant tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.schemas.job_spec import JobSpec, Task
from tests.engine.tiny_models import (
    chat_rows,
    make_gpt2_tokenizer,
    prompt_completion_rows,
    write_jsonl,
)
from workers.distill.contract import EngineError
from workers.distill.kernel import IGNORE_INDEX
from workers.distill.tasks.transformers.data import causal_targets, read_text_splits, tokenise_split


def _spec(path: str, task: str = "causal-lm") -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher_model_name": "t",
            "task": task,
            "dataset_config": {"kind": "file", "path": path},
            "training_config": {"max_seq_length": 64},
        }
    )


def test_chat_masking_touches_only_assistant_tokens(tmp_path: Path) -> None:
    rows = chat_rows(30, seed=3)
    write_jsonl(tmp_path / "chat.jsonl", rows)
    splits = read_text_splits(_spec("chat.jsonl"), file_root=tmp_path)
    assert splits.train.messages is not None and len(splits.train.messages) == 24
    tokenizer = make_gpt2_tokenizer(chat=True)
    dataset = tokenise_split(splits.train, tokenizer, Task.causal_lm, max_length=64, seed=0)
    ids, attention, loss_mask = (dataset.tensors[k] for k in ("input_ids", "attention_mask", "loss_mask"))
    for i, conversation in enumerate(splits.train.messages):
        # The expected target tokens, by hand: each assistant message's content and its <|end|>.
        expected = [
            w for m in conversation if m["role"] == "assistant" for w in [*m["content"].split(), "<|end|>"]
        ]
        tokens = tokenizer.convert_ids_to_tokens(ids[i][attention[i] == 1].tolist())
        marked = [t for t, m in zip(tokens, loss_mask[i][attention[i] == 1].tolist(), strict=True) if m]
        assert marked == expected
        # The full sequence is the template's rendering of the conversation.
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert tokens == str(rendered).split()
        # Next-token targets: only assistant tokens are predicted; every user/system token is ignored.
        targets = causal_targets(ids[i : i + 1], attention[i : i + 1], loss_mask[i : i + 1])[0]
        predicted = tokenizer.convert_ids_to_tokens(targets[targets != IGNORE_INDEX].tolist())
        assert predicted == expected
        assert "<|user|>" not in predicted and "<|assistant|>" not in predicted


def test_prompt_completion_loss_on_completion_and_eos_only(tmp_path: Path) -> None:
    rows = prompt_completion_rows(20, seed=1)
    write_jsonl(tmp_path / "pc.jsonl", rows)
    splits = read_text_splits(_spec("pc.jsonl"), file_root=tmp_path)
    assert splits.test.pairs is not None
    tokenizer = make_gpt2_tokenizer()
    dataset = tokenise_split(splits.test, tokenizer, Task.causal_lm, max_length=64, seed=0)
    for i, (prompt, completion) in enumerate(splits.test.pairs):
        row = dataset.tensors["input_ids"][i][dataset.tensors["attention_mask"][i] == 1]
        mask = dataset.tensors["loss_mask"][i][dataset.tensors["attention_mask"][i] == 1]
        tokens = tokenizer.convert_ids_to_tokens(row.tolist())
        assert tokens == [*prompt.split(), *completion.split(), "<|endoftext|>"]
        assert mask.tolist() == [0] * len(prompt.split()) + [1] * (len(completion.split()) + 1)


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    splits = read_text_splits(_spec("chat.jsonl"), file_root=tmp_path)
    with pytest.raises(EngineError, match="no chat template") as caught:
        tokenise_split(splits.train, make_gpt2_tokenizer(), Task.causal_lm, max_length=64, seed=0)
    assert caught.value.code == "tokenizer_invalid"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
        ({"messages": "hi"}, "non-empty list"),
    ],
)
def test_bad_chat_rows_name_the_row(tmp_path: Path, row: dict[str, object], message: str) -> None:
    rows = [*chat_rows(11), row]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EngineError, match=message) as caught:
        read_text_splits(_spec("bad.jsonl"), file_root=tmp_path)
    assert "row 12" in caught.value.message


def test_chat_rows_refused_for_masked_lm(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    with pytest.raises(EngineError, match="lacks column"):  # chat rows are read for causal-lm only
        read_text_splits(_spec("chat.jsonl", task="masked-lm"), file_root=tmp_path)


def test_truncation_keeps_masks_aligned(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "pc.jsonl", prompt_completion_rows(20, seed=2))
    splits = read_text_splits(_spec("pc.jsonl"), file_root=tmp_path)
    dataset = tokenise_split(splits.train, make_gpt2_tokenizer(), Task.causal_lm, max_length=6, seed=0)
    assert dataset.tensors["input_ids"].shape[1] == 6
    assert torch.equal(
        dataset.tensors["loss_mask"] * (1 - dataset.tensors["attention_mask"]),
        torch.zeros(16, 6, dtype=torch.long),
    )


def test_causal_lm_example_is_a_valid_job_with_readable_data() -> None:
    repo = Path(__file__).resolve().parents[2]
    spec = JobSpec.model_validate(json.loads((repo / "examples" / "causal_lm.json").read_text()))
    assert spec.task == Task.causal_lm and spec.training_config.lm_loss == "jsd"
    splits = read_text_splits(spec, file_root=repo)
    assert splits.train.pairs is not None and len(splits.train.pairs) >= 8
