"""LM KD end to end with a tiny trained GPT-2 teacher: divergences, chat, on-policy, sequence KD."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from app.schemas.job_spec import JobSpec
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from app.services import teacher_caches
from tests.engine.tiny_models import (
    chat_rows,
    lm_rows,
    make_gpt2_tokenizer,
    prompt_completion_rows,
    save_tiny_gpt2,
    train_tiny_gpt2,
    write_jsonl,
)
from workers.distill.config import EngineConfig
from workers.distill.contract import EngineError, JobPaths, NullCallbacks, StopChecker
from workers.distill.kernel import IGNORE_INDEX, TensorDictDataset
from workers.distill.loop import eval_loader
from workers.distill.losses import LossInputs, combine_losses
from workers.distill.registry import get_adapter
from workers.distill.runner import run_job
from workers.distill.signal_cache import cached_teacher_signal
from workers.distill.tasks.transformers.generation import generate_continuations
from workers.distill.teacher_cache import TeacherCacheStore

torch.set_num_threads(2)


class Events(NullCallbacks):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.messages.append(message)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny GPT-2 teacher (chat tokenizer) trained on plain texts, chats and prompt/completion rows."""
    root = tmp_path_factory.mktemp("lm")
    texts = [str(r["text"]) for r in lm_rows(200, seed=5)]
    write_jsonl(root / "lm.jsonl", [{"text": t} for t in texts])
    chats = chat_rows(160, seed=6)
    write_jsonl(root / "chat.jsonl", chats)
    pcs = prompt_completion_rows(160, seed=7)
    write_jsonl(root / "pc.jsonl", pcs)
    tokenizer = make_gpt2_tokenizer(chat=True)
    corpus = texts + [str(tokenizer.apply_chat_template(r["messages"], tokenize=False)) for r in chats]  # type: ignore[arg-type]
    corpus += [f"{r['prompt']} {r['completion']}" for r in pcs]
    train_tiny_gpt2(root / "gpt2", corpus, chat=True, hidden=32, steps=80, batch_size=16)
    return root


def _spec(data: str, **training: Any) -> JobSpec:
    config = {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "temperature": 1.0, "max_seq_length": 32}
    return JobSpec.model_validate(
        {
            "teacher_model_name": "tiny",
            "task": "causal-lm",
            "target_compression": 0.4,
            "dataset_config": {"kind": "file", "path": data},
            "training_config": {**config, **training},
        }
    )


def _teacher(name: str) -> TeacherSource:
    return TeacherSource(name=name, kind=TeacherSourceKind.local, location=name, type="transformer")


@pytest.mark.parametrize(
    ("divergence", "tail"),
    [("forward_kl", False), ("reverse_kl", True), ("jsd", False), ("skew_kl", True), ("tvd", True)],
)
def test_each_divergence_lowers_held_out_perplexity(root: Path, divergence: str, tail: bool) -> None:
    """KD alone (no label term), from the cached top-k of a trained teacher: held-out perplexity falls."""
    spec = _spec("lm.jsonl", lm_loss=divergence, topk_tail=tail, teacher_cache_top_k=8)
    adapter = get_adapter("causal-lm")
    data = adapter.load_data(spec, data_dir=root / "data", file_root=root)
    device = torch.device("cpu")
    teacher = adapter.load_teacher(
        _teacher("gpt2"), spec, data, data_dir=root / "data", file_root=root, device=device,
        callbacks=NullCallbacks(), trust_remote_code=False,
    )  # fmt: skip
    student = adapter.build_student(teacher, 0.4, seed=0)
    assert isinstance(data.train, TensorDictDataset)
    before = adapter.evaluate(student, eval_loader(data.test, data), device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    options = adapter.loss_options(spec)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = data.train.get_batch(torch.randint(0, len(data.train), (32,), generator=generator))
        with torch.no_grad():
            cached = adapter.cache_teacher_outputs(adapter.forward(teacher, batch), spec, temperature=1.0)
        assert ("topk_lse" in cached.extra) == tail
        student.train()
        inputs = LossInputs(
            student=adapter.forward(student, batch), teacher=cached, targets=adapter.targets(batch),
            temperature=1.0, options=options,
        )  # fmt: skip
        total, _ = combine_losses({"token_kl": 1.0}, inputs)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    after = adapter.evaluate(student, eval_loader(data.test, data), device)
    teacher_ppl = adapter.evaluate(teacher, eval_loader(data.test, data), device)
    assert after < 0.85 * before, (divergence, before, after, teacher_ppl)


def test_generated_continuations_keep_the_prompt_and_mark_only_new_tokens(root: Path) -> None:
    tokenizer = make_gpt2_tokenizer(chat=True)
    model = train_tiny_gpt2(root / "scratch", ["the day was good"], steps=1, hidden=32)
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    attention = (torch.arange(6) < torch.tensor([[4], [6]])).long()
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    out = generate_continuations(
        model, {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask},
        max_new_tokens=3, max_length=32, pad_token_id=0, eos_token_id=None, sample=True, temperature=1.0,
    )  # fmt: skip
    del tokenizer
    # Prompts are the tokens before the first target token: 2 and 4 tokens; then 3 new tokens each.
    assert out["attention_mask"].sum(dim=1).tolist() == [5, 7]
    assert out["input_ids"][0, :2].tolist() == [5, 6] and out["input_ids"][1, :4].tolist() == [9, 10, 11, 12]
    assert out["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0] and out["loss_mask"][1].tolist() == [
        0,
        0,
        0,
        0,
        1,
        1,
        1,
    ]


def test_on_policy_fraction_of_steps_uses_student_samples_scored_fresh(root: Path) -> None:
    spec = _spec("lm.jsonl", on_policy_fraction=0.5, max_new_tokens=4)
    adapter = get_adapter("causal-lm")
    data = adapter.load_data(spec, data_dir=root / "data", file_root=root)
    teacher = adapter.load_teacher(
        _teacher("gpt2"), spec, data, data_dir=root / "data", file_root=root, device=torch.device("cpu"),
        callbacks=NullCallbacks(), trust_remote_code=False,
    )  # fmt: skip
    student = adapter.build_student(teacher, 0.4, seed=0)
    assert isinstance(data.train, TensorDictDataset)
    rng = random.Random(0)
    batch = data.train.get_batch(torch.arange(8))
    chosen = [
        adapter.step_batch(
            batch, torch.arange(8), student=student, data=data, spec=spec, distilling=True, rng=rng
        )
        for _ in range(40)
    ]
    fresh = [c for c in chosen if c.fresh_teacher]
    assert 10 <= len(fresh) <= 30  # about half
    for step in fresh:
        assert step.skip_terms == ("hard_target_ce",)
        targets = adapter.targets(step.batch)
        # Targets only on generated tokens: the prompt is the first half of each text.
        prompt = data.train.tensors["attention_mask"][:8].sum(dim=1) // 2
        for i in range(8):
            first = int((targets[i] != IGNORE_INDEX).nonzero()[0, 0])
            assert first == int(prompt[i]) - 1
    # The baseline (labels only) never goes on-policy.
    plain = adapter.step_batch(
        batch, torch.arange(8), student=student, data=data, spec=spec, distilling=False, rng=rng
    )
    assert not plain.fresh_teacher and plain.batch is batch


def test_chat_data_on_policy_jsd_job_lowers_perplexity_and_reports_agreement(root: Path) -> None:
    spec = _spec(
        "chat.jsonl", lm_loss="jsd", beta=0.5, on_policy_fraction=0.5, max_new_tokens=6, alpha=0.8,
        teacher_cache="on", teacher_cache_top_k=8, topk_tail=True, baseline=True, epochs=3,
    )  # fmt: skip
    results = run_job(
        spec, teacher=_teacher("gpt2"), paths=JobPaths(root / "job-chat"), data_dir=root / "data",
        file_root=root,
    )  # fmt: skip
    assert results.metric == "perplexity" and results.student_accuracy is not None
    assert results.student_accuracy < 0.75 * results.initial_student_accuracy
    agreement = results.teacher_agreement
    assert 0.3 < agreement <= 1.0
    assert results.baseline_accuracy is not None and results.kd_gain_unit == "perplexity"


def test_sequence_kd_trains_on_stored_teacher_targets_and_reuses_them(root: Path) -> None:
    spec = _spec("pc.jsonl", sequence_kd=True, max_new_tokens=8, epochs=3)
    events = Events()
    results = run_job(
        spec, teacher=_teacher("gpt2"), paths=JobPaths(root / "job-seq"), data_dir=root / "data",
        file_root=root, callbacks=events,
    )  # fmt: skip
    assert "sequence_kd: teacher generating targets" in events.messages
    assert results.student_accuracy is not None
    assert results.student_accuracy < 0.75 * results.initial_student_accuracy
    assert set(results.training_history[0].losses) == {"hard_target_ce"}  # type: ignore[attr-defined]
    assert len(list((root / "data" / "sequence_kd").glob("*.json"))) == 1
    again = Events()
    run_job(
        spec.model_copy(update={"training_config": spec.training_config.model_copy(update={"epochs": 1})}),
        teacher=_teacher("gpt2"), paths=JobPaths(root / "job-seq2"), data_dir=root / "data",
        file_root=root, callbacks=again,
    )  # fmt: skip
    assert "sequence_kd targets reused" in again.messages
    assert "sequence_kd: teacher generating targets" not in again.messages


def test_second_job_on_the_same_teacher_and_data_hits_the_cache_and_skips_the_teacher_pass(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_root = root / "signal"
    engine = EngineConfig(signal_cache_dir=cache_root, signal_cache_owner="tenant-a")
    spec = _spec("lm.jsonl", teacher_cache="on", teacher_cache_top_k=8, epochs=1)
    first = run_job(
        spec, teacher=_teacher("gpt2"), paths=JobPaths(root / "cache-1"), data_dir=root / "data",
        file_root=root, config=engine,
    )  # fmt: skip
    missed = first.teacher_signal_cache
    assert missed["status"] == "miss" and missed["teacher_seconds_saved"] == 0.0
    # 8 float16 values + 8 int32 ids + an int8 mask per real token, plus a small header.
    assert 49 <= missed["bytes_per_token"] < 60
    (entry,) = teacher_caches.entries(cache_root, owner="tenant-a")
    assert entry.key == missed["key"] and entry.meta["tokens"] == missed["tokens"]

    # The second job (another student size, same teacher + data + length + k) never runs the teacher pass.
    def no_teacher_pass(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the teacher pass ran although the cache should have been hit")

    monkeypatch.setattr(TeacherCacheStore, "build", no_teacher_pass)
    second_spec = spec.model_copy(update={"target_compression": 0.3})
    second = run_job(
        second_spec, teacher=_teacher("gpt2"), paths=JobPaths(root / "cache-2"), data_dir=root / "data",
        file_root=root, config=engine,
    )  # fmt: skip
    hit = second.teacher_signal_cache
    assert hit["status"] == "hit" and hit["key"] == missed["key"]
    assert hit["teacher_seconds_saved"] == pytest.approx(missed["teacher_seconds"])
    assert second.teacher_cache_used and second.student_accuracy is not None
    assert second.student_accuracy < second.initial_student_accuracy
    hits = teacher_caches.get(cache_root, owner="tenant-a", key=missed["key"])
    assert hits is not None and hits.meta["hits"] == 1

    # Another tenant never reuses it (and k is part of the key): the teacher pass is needed again.
    with pytest.raises(AssertionError, match="teacher pass ran"):
        run_job(
            second_spec, teacher=_teacher("gpt2"), paths=JobPaths(root / "cache-3"), data_dir=root / "data",
            file_root=root, config=EngineConfig(signal_cache_dir=cache_root, signal_cache_owner="tenant-b"),
        )  # fmt: skip


def test_stored_signal_trains_like_the_in_memory_one(root: Path) -> None:
    """Hit and miss train from the same stored form; it matches the teacher's top-k within float16."""
    spec = _spec("lm.jsonl", teacher_cache_top_k=8, topk_tail=True)
    adapter = get_adapter("causal-lm")
    data = adapter.load_data(spec, data_dir=root / "data", file_root=root)
    teacher = adapter.load_teacher(
        _teacher("gpt2"), spec, data, data_dir=root / "data", file_root=root, device=torch.device("cpu"),
        callbacks=NullCallbacks(), trust_remote_code=False,
    )  # fmt: skip
    common: dict[str, Any] = {"device": torch.device("cpu"), "temperature": 2.0, "batch_size": 64}
    cache, report = cached_teacher_signal(
        teacher, adapter, data, spec, data_dir=root / "signal-2", owner="local", max_bytes=10**9,
        memory_bytes=None, stopper=StopChecker(NullCallbacks()), **common,
    )  # fmt: skip
    assert cache is not None and report["status"] == "miss" and report["tail"]
    assert isinstance(data.train, TensorDictDataset)
    indices = torch.tensor([3, 0, 7])
    batch = data.train.get_batch(indices)
    with torch.no_grad():
        direct = adapter.cache_teacher_outputs(adapter.forward(teacher, batch), spec, temperature=2.0)
    stored = cache.lookup(indices, direct)
    real = batch["attention_mask"].bool()
    assert torch.equal(stored.extra["topk_ids"][real], direct.extra["topk_ids"][real])
    assert torch.allclose(stored.logits[real], direct.logits[real], atol=2e-2)
    assert torch.allclose(stored.extra["topk_lse"][real], direct.extra["topk_lse"][real], atol=1e-5)
    # A bound smaller than the cache: nothing stored, the in-memory signal is used.
    small, refused = cached_teacher_signal(
        teacher, adapter, data, spec, data_dir=root / "signal-3", owner="local", max_bytes=100,
        memory_bytes=None, stopper=StopChecker(NullCallbacks()), **common,
    )  # fmt: skip
    assert small is not None and refused["status"] == "not_stored"
    assert teacher_caches.entries(root / "signal-3", owner=None) == []


def test_a_student_with_its_own_tokenizer_learns_by_sequence_kd_and_is_refused_for_logit_kd(
    root: Path,
) -> None:
    own = make_gpt2_tokenizer(chat=True, extra_words=("zebra", "quartz"))  # other ids from 'zebra' on
    save_tiny_gpt2(root / "student-own", layers=1, hidden=32, heads=4, tokenizer=own)
    base = _spec("pc.jsonl", epochs=1).model_dump(mode="json")
    base["student"] = {"kind": "local", "path": "student-own"}
    base["target_compression"] = None
    logit_kd = JobSpec.model_validate(base)
    with pytest.raises(EngineError, match="sequence_kd") as refused:
        run_job(
            logit_kd, teacher=_teacher("gpt2"), paths=JobPaths(root / "own-1"), data_dir=root / "data",
            file_root=root,
        )  # fmt: skip
    assert refused.value.code == "student_incompatible" and "another vocabulary" in refused.value.message
    base["training_config"] |= {"sequence_kd": True, "max_new_tokens": 8}
    spec = JobSpec.model_validate(base)
    results = run_job(
        spec, teacher=_teacher("gpt2"), paths=JobPaths(root / "own-2"), data_dir=root / "data", file_root=root
    )  # fmt: skip
    assert (
        results.student_accuracy is not None and results.student_accuracy < results.initial_student_accuracy
    )
    assert results.sequence_kd is not None and "own" in results.sequence_kd["student_tokenizer"]
    assert results.teacher_agreement is None  # token ids of the two tokenizers do not correspond
    saved = PreTrainedTokenizerFast.from_pretrained(root / "own-2" / "artifacts")
    assert "zebra" in saved.get_vocab() and saved.get_vocab() == own.get_vocab()
