"""Task adapters for transformer jobs: sequence classification, causal LM and masked LM."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.schemas.job_spec import DistillationMethod, JobSpec, Task
from app.schemas.teachers import TeacherSource
from workers.distill.adapter import BuiltStudent, StepBatch, TaskAdapter
from workers.distill.contract import (
    ARTIFACT_CONFIG,
    ARTIFACT_WEIGHTS,
    EngineCallbacks,
    EngineError,
    JobStopped,
    NamedStudent,
    Progress,
)
from workers.distill.fingerprint import model_fingerprint, tensors_fingerprint
from workers.distill.kernel import (
    IGNORE_INDEX,
    Batch,
    ModelOutputs,
    TaskData,
    TensorDictDataset,
    to_device,
)
from workers.distill.losses import LossInputs, register_loss
from workers.distill.tasks.transformers.data import (
    TextSplits,
    causal_targets,
    encode_segments,
    read_text_splits,
    tokenise_split,
)
from workers.distill.tasks.transformers.finetune import (
    finetune_classifier,
    finetune_key,
    finetune_lock,
    finetuned_dir,
)
from workers.distill.tasks.transformers.generation import generate_continuations
from workers.distill.tasks.transformers.losses import token_divergence, topk_teacher_logits
from workers.distill.tasks.transformers.models import (
    AUTO_CLASSES,
    build_hf_student,
    load_hf_teacher,
    teacher_location,
)
from workers.distill.tasks.transformers.onnx_export import ONNX_OPSET, LogitsOnly, export_onnx
from workers.distill.tasks.transformers.students import build_named_hf_student

ONNX_FILE = "student.onnx"
INT8_FILE = "student_int8.safetensors"


def _attn_implementation(spec: JobSpec) -> str:
    """Eager attention when attention maps are distilled (sdpa returns none); sdpa otherwise (faster)."""
    method = spec.distillation_method
    return "eager" if method == DistillationMethod.attention else "sdpa"


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` gets the bytes of `source` (a hard link when the filesystem allows)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class HFTaskAdapter(TaskAdapter):
    """Shared behaviour of the transformer tasks; subclasses set the task, metric and targets.

    The tokenizer belongs to the teacher, so `load_data` reads and splits raw text and `load_teacher`
    tokenises the splits in place (the loop reads `data.train/val/test` only after `load_teacher`).
    """

    task: ClassVar[Task]

    def __init__(self) -> None:
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: TextSplits | None = None
        self.compile_students = False  # training_config.compile on a CUDA device

    # ---- data and models ---------------------------------------------------------------------------

    def load_data(self, spec: JobSpec, *, data_dir: Path, file_root: Path | None) -> TaskData:
        """Read and split the job's texts; tokenised later, with the teacher's tokenizer."""
        del data_dir
        self.splits = read_text_splits(spec, file_root=file_root)
        empty = TensorDictDataset({"input_ids": torch.zeros(0, 1, dtype=torch.long)})
        info: dict[str, Any] = {
            "fingerprint": self.splits.fingerprint,
            "tokenised": False,
            "splits": self.splits.report,
        }
        if self.splits.label_names:
            info["label_names"] = self.splits.label_names
        return TaskData(
            train=empty, val=empty, test=empty, collate=None, num_labels=self.splits.num_labels, info=info
        )

    def _tokenise(self, data: TaskData, tokenizer: PreTrainedTokenizerBase, spec: JobSpec) -> None:
        """Fill `data`'s splits with token tensors (masking seeds differ per split)."""
        assert self.splits is not None, "load_data runs before load_teacher"
        length = spec.training_config.max_seq_length
        seed = spec.training_config.seed
        data.train = tokenise_split(self.splits.train, tokenizer, self.task, max_length=length, seed=seed)
        data.val = tokenise_split(self.splits.val, tokenizer, self.task, max_length=length, seed=seed + 1)
        data.test = tokenise_split(self.splits.test, tokenizer, self.task, max_length=length, seed=seed + 2)
        data.info["tokenizer"] = tokenizer
        data.info["tokenised"] = True

    def load_teacher(
        self,
        source: TeacherSource,
        spec: JobSpec,
        data: TaskData,
        *,
        data_dir: Path,
        file_root: Path | None,
        device: torch.device,
        callbacks: EngineCallbacks,
        trust_remote_code: bool,
    ) -> nn.Module:
        """Load the teacher and its tokenizer, tokenise the data; fine-tune a missing classification head."""
        attn = _attn_implementation(spec)
        self.compile_students = spec.training_config.compile and device.type == "cuda"
        loaded = load_hf_teacher(
            source,
            self.task,
            num_labels=data.num_labels,
            file_root=file_root,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn,
        )
        self.tokenizer = loaded.tokenizer
        self._tokenise(data, loaded.tokenizer, spec)
        model = loaded.model
        data.info["teacher_finetuned"] = False
        if loaded.needs_finetune:
            if spec.training_config.teacher_finetune_epochs == 0:
                raise EngineError(
                    "teacher_invalid",
                    f"teacher '{source.name}' has no trained head for {data.num_labels} labels "
                    f"({', '.join(loaded.missing_head_keys[:3])}); set teacher_finetune_epochs >= 1",
                )
            model = self._finetuned_teacher(
                model, source, spec, data, data_dir, file_root, device, callbacks, attn
            )
            data.info["teacher_finetuned"] = True
        nn.Module.to(model, device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    def _finetuned_teacher(
        self,
        model: PreTrainedModel,
        source: TeacherSource,
        spec: JobSpec,
        data: TaskData,
        data_dir: Path,
        file_root: Path | None,
        device: torch.device,
        callbacks: EngineCallbacks,
        attn: str,
    ) -> PreTrainedModel:
        """Fine-tune once per (teacher, data, settings) and keep it under data_dir, so resumes reuse it."""
        assert isinstance(data.train, TensorDictDataset) and data.num_labels is not None
        key = finetune_key(
            teacher_location(source, file_root), str(data.info["fingerprint"]), spec, data.num_labels
        )
        directory = finetuned_dir(data_dir, key)
        with finetune_lock(data_dir, key):
            if not (directory / "config.json").is_file():
                callbacks.on_event("phase", "teacher_finetune started", {"phase": "teacher_finetune"})
                metrics = finetune_classifier(model, data.train, spec, device=device, callbacks=callbacks)
                partial = directory.with_name(directory.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                model.save_pretrained(partial)
                partial.rename(directory)
                callbacks.on_event(
                    "phase", "teacher_finetune finished", {"phase": "teacher_finetune", **metrics}
                )
                return model
        callbacks.on_event("phase", "teacher_finetune reused", {"phase": "teacher_finetune", "key": key})
        reloaded = type(model).from_pretrained(directory, attn_implementation=attn, weights_only=True)
        assert isinstance(reloaded, PreTrainedModel)
        return reloaded

    def build_student(self, teacher: nn.Module, target_compression: float, *, seed: int) -> nn.Module:
        """A narrower/shallower model of the teacher's class, initialised from its layers."""
        assert isinstance(teacher, PreTrainedModel)
        student = build_hf_student(teacher, target_compression, seed=seed).cpu()
        if self.compile_students:
            # In place (state_dict keys unchanged, so checkpoints and save_pretrained are unaffected);
            # dynamic shapes because batches differ in size (the last one) and splits in length.
            student.compile(dynamic=True)
        return student

    def build_named_student(
        self,
        student: NamedStudent,
        teacher: nn.Module,
        spec: JobSpec,
        data: TaskData,
        *,
        file_root: Path | None,
        trust_remote_code: bool,
    ) -> BuiltStudent:
        """A registry/hub/local save_pretrained model, or the teacher config with overrides (students.py)."""
        assert isinstance(teacher, PreTrainedModel)
        return build_named_hf_student(
            student,
            teacher,
            self.task,
            spec,
            data,
            file_root=file_root,
            trust_remote_code=trust_remote_code,
            attn_implementation=_attn_implementation(spec),
        )

    # ---- forward, targets, metric ------------------------------------------------------------------

    def forward(
        self, model: nn.Module, batch: Batch, *, hidden_states: bool = False, attentions: bool = False
    ) -> ModelOutputs:
        """Logits (B, C) or (B, T, V), hidden states per layer incl. embeddings (B, T, H), attentions."""
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=hidden_states,
            output_attentions=attentions,
        )
        if attentions and output.attentions is None:
            raise EngineError("unsupported", "this model returns no attention maps (needs eager attention)")
        return ModelOutputs(
            logits=output.logits,
            hidden_states=tuple(output.hidden_states) if hidden_states else None,
            attentions=tuple(output.attentions) if attentions else None,
            extra={"attention_mask": batch["attention_mask"]},
        )

    def example_batch(self, data: TaskData, batch_size: int) -> Batch:
        """`batch_size` test rows (repeated when the split is smaller): input_ids, attention_mask (B, T)."""
        assert isinstance(data.test, TensorDictDataset)
        indices = torch.arange(batch_size) % len(data.test)
        batch = data.test.get_batch(indices)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # ---- artifacts ---------------------------------------------------------------------------------

    def save_student(self, student: nn.Module, out_dir: Path, data: TaskData) -> list[Path]:
        """save_pretrained (+ tokenizer) into out_dir, so `from_pretrained(out_dir)` loads it as is.

        Also `student.safetensors` (same bytes as model.safetensors) and `student_config.json` naming the
        transformers class, for clients that read the engine's common artifact names.
        """
        assert isinstance(student, PreTrainedModel)
        out_dir.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out_dir, safe_serialization=True)
        tokenizer = data.info.get("tokenizer") or self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        _link_or_copy(out_dir / "model.safetensors", out_dir / ARTIFACT_WEIGHTS)
        recipe = {
            "format": "transformers",
            "architecture": type(student).__name__,
            "task": str(self.task),
            "config": "config.json",
            "weights": "model.safetensors",
            "load": f"transformers.{AUTO_CLASSES[self.task].__name__}.from_pretrained(<this directory>)",
        }
        (out_dir / ARTIFACT_CONFIG).write_text(json.dumps(recipe, indent=2))
        return sorted(p for p in out_dir.iterdir() if p.is_file())

    def export_program(self, student: nn.Module, path: Path, data: TaskData) -> None:
        """torch.export of (input_ids, attention_mask) -> logits with dynamic batch and sequence length."""
        assert isinstance(student, PreTrainedModel)
        example = self.example_batch(data, 2)
        # A CPU copy (not compiled): the program loads anywhere, the student is left where it was.
        cpu_student = copy.deepcopy(student).cpu().eval()
        wrapper = LogitsOnly(cpu_student).eval()
        batch = torch.export.Dim("batch", min=1, max=4096)
        seq = torch.export.Dim("seq", min=2, max=int(student.config.max_position_embeddings))
        dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        with torch.no_grad():
            program = torch.export.export(
                wrapper, (example["input_ids"], example["attention_mask"]), dynamic_shapes=dynamic
            )
        torch.export.save(program, str(path))


class SequenceClassificationAdapter(HFTaskAdapter):
    """BERT/RoBERTa classifiers; accuracy on the held-out split."""

    task = Task.sequence_classification
    metric = "accuracy"
    higher_is_better = True

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch["labels"]  # (B,)

    def export_extras(
        self, student: nn.Module, out_dir: Path, data: TaskData, callbacks: EngineCallbacks
    ) -> dict[str, Any]:
        """`student.onnx` of the final fp32 student beside the save_pretrained files.

        The ONNX logits are checked against PyTorch's; the outcome (or the exporter's error, which then
        does not fail an otherwise finished job) is reported in the results as `onnx_export`.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            difference = export_onnx(student, out_dir / ONNX_FILE, self.example_batch(data, 2))
        except EngineError as exc:
            callbacks.on_event("warning", f"ONNX export failed: {exc.message}", {"phase": "export"})
            return {"onnx_export": {"file": None, "error": exc.message}}
        return {"onnx_export": {"file": ONNX_FILE, "opset": ONNX_OPSET, "max_abs_difference": difference}}


class _TokenAdapter(HFTaskAdapter):
    """Language-model tasks: perplexity, token-level KD, top-k teacher cache.

    Logits are cut to the tokenizer's vocabulary (`len(tokenizer)`): a model whose embedding rows were
    padded (rounded up to a multiple of 64 or 128) gives logits for ids no token has, and teacher and student
    of the same tokenizer then compare on the same ids whatever their padding.
    """

    metric = "perplexity"
    higher_is_better = False

    cross_tokenizer = False  # a sequence_kd student with its own tokenizer: the data are in its tokens

    def forward(
        self, model: nn.Module, batch: Batch, *, hidden_states: bool = False, attentions: bool = False
    ) -> ModelOutputs:
        if self.cross_tokenizer:
            # The data are the student's tokens: the teacher only runs on them to be timed (measure), so
            # ids beyond its vocabulary are clamped; nothing compares the two models' logits.
            rows = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
            batch = {**batch, "input_ids": batch["input_ids"].clamp_max(int(rows) - 1)}
            return super().forward(model, batch, hidden_states=hidden_states, attentions=attentions)
        outputs = super().forward(model, batch, hidden_states=hidden_states, attentions=attentions)
        width = len(self.tokenizer) if self.tokenizer is not None else None
        if width is not None and outputs.logits.shape[-1] > width:
            outputs.logits = outputs.logits[..., :width]  # (B, T, V_padded) -> (B, T, V)
        return outputs

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        """exp(mean next-/masked-token NLL) over every non-ignored position of `loader`."""
        total_nll, count = self.evaluate_totals(model, loader, device)
        if count == 0:
            raise ValueError("evaluation split has no target tokens")
        return self.metric_from_totals(total_nll, count)

    @torch.inference_mode()
    def evaluate_totals(self, model: nn.Module, loader: Any, device: torch.device) -> tuple[float, float]:
        """(summed token NLL, target tokens) over `loader`: they add up across shards."""
        model.eval()
        total_nll = 0.0
        count = 0
        for cpu_batch in loader:
            batch = to_device(cpu_batch, device)
            logits = self.forward(model, batch).logits.float()  # (B, T, V)
            targets = self.targets(batch)  # (B, T)
            mask = targets != IGNORE_INDEX
            total_nll += float(F.cross_entropy(logits[mask], targets[mask], reduction="sum"))
            count += int(mask.sum())
        return total_nll, float(count)

    def metric_from_totals(self, numerator: float, denominator: float) -> float:
        """Perplexity from summed NLL and token count."""
        return math.exp(min(numerator / denominator, 50.0)) if denominator else math.inf

    @torch.inference_mode()
    def compare_with_teacher(
        self, teacher: nn.Module, student: nn.Module, data: TaskData, device: torch.device
    ) -> dict[str, Any]:
        """`teacher_agreement`: share of test target positions where student and teacher top tokens agree."""
        if self.cross_tokenizer:
            return {}  # different tokenizers: token ids do not correspond
        student.eval()
        same = 0
        count = 0
        for cpu_batch in _ordered_batches(data.test):
            batch = to_device(cpu_batch, device)
            targets = self.targets(batch)  # (B, T)
            mask = targets != IGNORE_INDEX
            student_logits = self.forward(student, batch).logits  # (B, T, V_s)
            teacher_logits = self.forward(teacher, batch).logits  # (B, T, V_t)
            if student_logits.shape[-1] != teacher_logits.shape[-1]:
                return {}  # different vocabularies: token ids do not correspond
            student_top, teacher_top = student_logits.argmax(dim=-1), teacher_logits.argmax(dim=-1)
            same += int((student_top[mask] == teacher_top[mask]).sum())
            count += int(mask.sum())
        return {"teacher_agreement": same / count} if count else {}

    def loss_weights(self, spec: JobSpec, *, temperature: float, alpha: float) -> dict[str, float]:
        """Token KD (full vocabulary or cached top-k) + next-token CE; hidden/attention terms by method."""
        weights = super().loss_weights(spec, temperature=temperature, alpha=alpha)
        weights["token_kl"] = weights.pop("soft_target_kl")
        return weights

    def reusable_teacher_signal(self, spec: JobSpec, *, hidden_states: bool, attentions: bool) -> bool:
        """Top-k logits alone (no hidden states or attention maps) are small and keyed well: reusable."""
        del spec
        return not hidden_states and not attentions

    def loss_options(self, spec: JobSpec) -> dict[str, Any]:
        """The divergence `token_kl` computes (training_config.lm_loss, beta, skew)."""
        config = spec.training_config
        return {"divergence": str(config.lm_loss), "beta": config.beta, "skew": config.skew}

    def cache_teacher_outputs(
        self, outputs: ModelOutputs, spec: JobSpec, *, temperature: float | None = None
    ) -> ModelOutputs:
        """Keep the teacher's top-k logits per token, not the whole vocabulary: (B, T, k) values + ids.

        With `topk_tail` also the full-vocabulary logsumexp(logits / T) (B, T), which gives the tail bin.
        """
        config = spec.training_config
        values, ids = topk_teacher_logits(outputs.logits, config.teacher_cache_top_k)
        extra = {**outputs.extra, "topk_ids": ids.to(torch.int32)}
        if config.topk_tail:
            scale = temperature if temperature is not None else config.temperature
            extra["topk_lse"] = torch.logsumexp(outputs.logits.float() / scale, dim=-1)  # (B, T)
        return ModelOutputs(
            logits=values, hidden_states=outputs.hidden_states, attentions=outputs.attentions, extra=extra
        )


class CausalLMAdapter(_TokenAdapter):
    """GPT-2 family: next-token distributions; also sequence-level KD and on-policy batches."""

    task = Task.causal_lm

    def load_teacher(
        self,
        source: TeacherSource,
        spec: JobSpec,
        data: TaskData,
        *,
        data_dir: Path,
        file_root: Path | None,
        device: torch.device,
        callbacks: EngineCallbacks,
        trust_remote_code: bool,
    ) -> nn.Module:
        """The teacher; with `sequence_kd` also its generated targets for the train split (built once)."""
        teacher = super().load_teacher(
            source,
            spec,
            data,
            data_dir=data_dir,
            file_root=file_root,
            device=device,
            callbacks=callbacks,
            trust_remote_code=trust_remote_code,
        )
        if spec.training_config.sequence_kd:
            data.info["sequence_kd_pairs"] = self._sequence_kd_targets(
                teacher, spec, data, data_dir=data_dir, device=device, callbacks=callbacks
            )
        return teacher

    def _sequence_kd_targets(
        self,
        teacher: nn.Module,
        spec: JobSpec,
        data: TaskData,
        *,
        data_dir: Path,
        device: torch.device,
        callbacks: EngineCallbacks,
    ) -> list[tuple[str, str]]:
        """Greedy teacher completions (prompt, completion) of every train prompt, stored under data_dir.

        Stored as text so the student's tokenizer reads them (any vocabulary; encoded at the first step);
        the file is keyed by the teacher's weights, the data and the generation settings, so every epoch, a
        resume and later jobs reuse it.
        """
        assert isinstance(data.train, TensorDictDataset) and self.tokenizer is not None
        config = spec.training_config
        tokenizer = self.tokenizer
        key = _sequence_kd_key(teacher, data.train, config.max_seq_length, config.max_new_tokens)
        path = data_dir / "sequence_kd" / f"{key}.json"
        started = time.monotonic()
        reused = path.is_file()
        if reused:
            stored = json.loads(path.read_text(encoding="utf-8"))
            callbacks.on_event(
                "phase", "sequence_kd targets reused", {"phase": "teacher", "key": key, "file": path.name}
            )
        else:
            callbacks.on_event("phase", "sequence_kd: teacher generating targets", {"phase": "teacher"})
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            assert pad is not None
            pairs: list[list[str]] = []
            total = len(data.train)
            size = config.batch_size
            for start in range(0, total, size):
                batch = to_device(data.train.get_batch(torch.arange(start, min(start + size, total))), device)
                generated = generate_continuations(
                    teacher,
                    batch,
                    max_new_tokens=config.max_new_tokens,
                    max_length=_max_positions(teacher, config.max_seq_length),
                    pad_token_id=int(pad),
                    eos_token_id=tokenizer.eos_token_id,
                    sample=False,
                )
                for ids, attention, mask in zip(
                    generated["input_ids"], generated["attention_mask"], generated["loss_mask"], strict=True
                ):
                    real = ids[attention.bool()].tolist()
                    target = mask[attention.bool()].bool().tolist()
                    prompt = [t for t, m in zip(real, target, strict=True) if not m]
                    completion = [t for t, m in zip(real, target, strict=True) if m]
                    pairs.append([str(tokenizer.decode(prompt)), str(tokenizer.decode(completion))])
                callbacks.on_progress(Progress(phase="teacher", fraction=min(start + size, total) / total))
                if callbacks.should_stop():
                    raise JobStopped("while the teacher generated sequence_kd targets")
            stored = {"key": key, "pairs": pairs, "seconds": time.monotonic() - started}
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(stored), encoding="utf-8")
            partial.replace(path)
        data.info["sequence_kd"] = {"key": key, "reused": reused, "teacher_seconds": stored["seconds"]}
        return [(str(prompt), str(completion)) for prompt, completion in stored["pairs"]]

    def build_named_student(
        self,
        student: NamedStudent,
        teacher: nn.Module,
        spec: JobSpec,
        data: TaskData,
        *,
        file_root: Path | None,
        trust_remote_code: bool,
    ) -> BuiltStudent:
        """A named student; one with its own tokenizer (sequence_kd only) gets the data in its tokens.

        The teacher's perplexity was measured in its own tokens before; the student's figures are in the
        student's tokens (results.sequence_kd.student_tokenizer says so).
        """
        built = super().build_named_student(
            student, teacher, spec, data, file_root=file_root, trust_remote_code=trust_remote_code
        )
        own = data.info.get("student_tokenizer")
        if own is not None:
            self._tokenise(data, own, spec)
            self.cross_tokenizer = True
            data.info["sequence_kd"] = {
                **data.info.get("sequence_kd", {}),
                "student_tokenizer": "own: student figures are per student token, the teacher's per its own",
            }
        return built

    def loss_weights(self, spec: JobSpec, *, temperature: float, alpha: float) -> dict[str, float]:
        """sequence_kd: cross-entropy on the teacher's generated targets only; else token KD + CE."""
        if spec.training_config.sequence_kd:
            return {"hard_target_ce": 1.0}
        return super().loss_weights(spec, temperature=temperature, alpha=alpha)

    def step_batch(
        self,
        batch: Batch,
        indices: torch.Tensor,
        *,
        student: nn.Module,
        data: TaskData,
        spec: JobSpec,
        distilling: bool,
        rng: random.Random,
    ) -> StepBatch:
        """Distillation steps: sequence-KD rows in place of the data's, or (on_policy_fraction of the
        steps) the student's own sampled continuations, which the teacher scores (loss on them only)."""
        config = spec.training_config
        if not distilling:
            return StepBatch(batch)
        device = batch["input_ids"].device
        if config.sequence_kd:
            if "sequence_kd_train" not in data.info:
                # The student's tokenizer (a named student may bring its own) encodes the teacher's text.
                tokenizer = data.info.get("student_tokenizer") or data.info["tokenizer"]
                examples = [[(p, False), (c, True)] for p, c in data.info["sequence_kd_pairs"]]
                data.info["sequence_kd_train"] = TensorDictDataset(
                    encode_segments(examples, tokenizer, config.max_seq_length)
                )
            generated: TensorDictDataset = data.info["sequence_kd_train"]
            return StepBatch(to_device(generated.get_batch(indices.cpu()), device))
        if config.on_policy_fraction > 0 and rng.random() < config.on_policy_fraction:
            tokenizer = data.info["tokenizer"]
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            sampled = generate_continuations(
                student,
                batch,
                max_new_tokens=config.max_new_tokens,
                max_length=_max_positions(student, config.max_seq_length),
                pad_token_id=int(pad),
                eos_token_id=tokenizer.eos_token_id,
                sample=True,
                temperature=config.on_policy_temperature,
            )
            # The KD term only: cross-entropy on the student's own samples would reinforce them.
            return StepBatch(sampled, fresh_teacher=True, skip_terms=("hard_target_ce",))
        return StepBatch(batch)

    def targets(self, batch: Batch) -> torch.Tensor:
        return causal_targets(batch["input_ids"], batch["attention_mask"], batch.get("loss_mask"))  # (B, T)


class MaskedLMAdapter(_TokenAdapter):
    """DistilBERT-style: MLM logits KD at masked positions plus hidden-state alignment."""

    task = Task.masked_lm

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch["mlm_labels"]  # (B, T)

    def loss_weights(self, spec: JobSpec, *, temperature: float, alpha: float) -> dict[str, float]:
        """Adds the hidden-state cosine term (weight feature_weight) for every method, as DistilBERT does."""
        weights = super().loss_weights(spec, temperature=temperature, alpha=alpha)
        weights.setdefault("feature_kd", spec.training_config.feature_weight)
        return weights


def _ordered_batches(dataset: Any, size: int = 64) -> Any:
    """CPU batches of a TensorDictDataset in order."""
    for start in range(0, len(dataset), size):
        yield dataset.get_batch(torch.arange(start, min(start + size, len(dataset))))


def _max_positions(model: nn.Module, max_seq_length: int) -> int:
    """The longest sequence to generate: max_seq_length, capped by the model's position embeddings."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(max_seq_length, int(positions)) if positions else max_seq_length


def _sequence_kd_key(
    teacher: nn.Module, train: TensorDictDataset, max_seq_length: int, max_new_tokens: int
) -> str:
    """sha256 of the teacher's weights, the tokenised train split and the generation settings."""
    parts = [
        model_fingerprint(teacher),
        tensors_fingerprint(train.tensors),
        f"greedy/{max_seq_length}/{max_new_tokens}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@register_loss("token_kl")
def token_kl_term(inputs: LossInputs) -> torch.Tensor:
    """Token-level KD for LMs: the job's divergence (`lm_loss`) on the full vocabulary or the cached top-k.

    The name stays `token_kl` (results' loss history) whichever divergence `inputs.options` selects.
    """
    assert inputs.teacher is not None
    teacher = inputs.teacher
    options = inputs.options
    common: dict[str, Any] = {
        "temperature": inputs.temperature,
        "divergence": options.get("divergence", "forward_kl"),
        "beta": float(options.get("beta", 0.5)),
        "skew": float(options.get("skew", 0.1)),
    }
    if "topk_ids" in teacher.extra:
        return token_divergence(
            inputs.student.logits,
            inputs.targets,
            teacher_topk=(teacher.logits, teacher.extra["topk_ids"]),
            teacher_lse=teacher.extra.get("topk_lse"),
            **common,
        )
    return token_divergence(inputs.student.logits, inputs.targets, teacher_logits=teacher.logits, **common)
