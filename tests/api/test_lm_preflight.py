"""Create-time tokenizer preflight for language models: 422 naming the difference and suggesting sequence_kd;
the same tokenizer with padded embedding rows passes; sequence_kd takes a student with its own tokenizer."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.core.config import get_settings
from app.services.model_info import first_differing_ids

WORDS = ["<|endoftext|>", "the", "film", "was", "good", "bad", "."]


def _gpt2_dir(name: str, words: list[str], *, vocab_size: int | None = None) -> Path:
    """What save_pretrained writes that matters here: config.json and a tokenizer.json vocabulary."""
    directory = get_settings().file_root / "lm-preflight" / uuid.uuid4().hex / name
    directory.mkdir(parents=True)
    config = {"model_type": "gpt2", "vocab_size": vocab_size or len(words), "n_layer": 2, "n_embd": 32}
    (directory / "config.json").write_text(json.dumps(config))
    vocab = {word: i for i, word in enumerate(words)}
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab}}))
    return directory


def _register(client: TestClient, location: Path) -> str:
    name = f"lm-{uuid.uuid4().hex[:8]}"
    payload = {"name": name, "kind": "local", "location": str(location), "type": "causal_lm"}
    response = client.post("/distillation/teachers", json=payload)
    assert response.status_code == 201, response.text
    return name


def _lm_job(teacher: str, student: Path, **training: Any) -> dict[str, Any]:
    data = student.parent / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": "the film was good ."}) + "\n" for _ in range(12)))
    return {
        "teacher_model_name": teacher,
        "task": "causal-lm",
        "student": {"kind": "local", "path": str(student)},
        "dataset_config": {"kind": "file", "path": str(data)},
        "training_config": {"epochs": 1, **training},
    }


def test_another_vocabulary_is_refused_with_the_difference_and_sequence_kd_suggested(
    client: TestClient, problem: Any
) -> None:
    teacher = _register(client, _gpt2_dir("teacher", WORDS))
    other = _gpt2_dir("other", [*WORDS[:3], "zebra", *WORDS[3:]])  # ids move from 3 on
    body = problem(client.post("/distillation/jobs", json=_lm_job(teacher, other)), 422)
    error = body["errors"][0]
    assert error["field"] == "student" and error["type"] == "vocabulary_mismatch"
    assert "teacher 7 tokens, student 8" in error["msg"]
    assert "first differing ids: 3 'was' vs 'zebra'" in error["msg"]
    assert "sequence_kd" in error["msg"]
    # With sequence_kd no logits are compared: the student keeps its own tokenizer.
    accepted = client.post("/distillation/jobs", json=_lm_job(teacher, other, sequence_kd=True))
    assert accepted.status_code == 201, accepted.text


def test_the_same_tokenizer_with_padded_embedding_rows_passes(client: TestClient) -> None:
    teacher = _register(client, _gpt2_dir("teacher", WORDS, vocab_size=64))  # rounded up to 64
    student = _gpt2_dir("student", WORDS)
    response = client.post("/distillation/jobs", json=_lm_job(teacher, student))
    assert response.status_code == 201, response.text


def test_first_differing_ids_by_hand() -> None:
    teacher = {"a": 0, "b": 1, "c": 2}
    assert first_differing_ids(teacher, {"a": 0, "c": 1, "b": 2}) == [(1, "b", "c"), (2, "c", "b")]
    assert first_differing_ids(teacher, {"a": 0, "b": 1}) == [(2, "c", None)]
    assert first_differing_ids(teacher, dict(teacher)) == []
