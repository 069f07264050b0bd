"""Named transformer students: load a registry/hub/local model, or apply config overrides to the teacher's.

Every named student is checked against the teacher before training: the student reads the teacher's tokens
(the data are tokenised once, with the teacher's tokenizer), so the vocabularies must be the same, and for
language-model tasks its logits are compared with the teacher's over that vocabulary; a sequence-classifier
gets a head for the data's labels (a new one when its own has another size, reported as `new_head`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from app.core.model_files import UNSAFE_MODEL_FILE, describe_unsafe, unsafe_model_files
from app.core.paths import PathKind
from app.schemas.job_spec import JobSpec, Task
from app.schemas.teachers import TeacherSourceKind
from app.services.model_info import vocabulary_difference
from workers.distill.adapter import BuiltStudent
from workers.distill.contract import EngineError, NamedStudent, resolve_local_path
from workers.distill.kernel import TaskData, TensorDictDataset, count_parameters
from workers.distill.losses import layer_mapping
from workers.distill.tasks.transformers.models import (
    AUTO_CLASSES,
    initialise_from_teacher,
)

# Config fields an override may not change: they define the token space or the model family.
FROZEN_FIELDS = ("vocab_size", "model_type", "architectures", "pad_token_id", "num_labels")


def _vocabulary_difference(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> str | None:
    """None when both tokenizers map the same tokens to the same ids; else the create-time check's wording."""
    return vocabulary_difference(teacher.get_vocab(), student.get_vocab())


def _student_location(named: NamedStudent, file_root: Path | None) -> str:
    source = named.source
    assert source is not None
    if source.kind == TeacherSourceKind.local:
        directory = resolve_local_path(
            source.location,
            file_root,
            kind=PathKind.directory,
            what=f"student '{named.name}' directory",
            missing_code="student_not_found",
        )
        if not (directory / "config.json").is_file():
            raise EngineError(
                "student_not_found",
                f"student '{named.name}': its directory has no config.json; give a save_pretrained directory",
            )
        unsafe = unsafe_model_files(directory)  # read as opcodes, never unpickled
        if unsafe:
            raise EngineError(UNSAFE_MODEL_FILE, f"student '{named.name}': {describe_unsafe(unsafe)}")
        return str(directory)
    if source.kind == TeacherSourceKind.hub:
        return source.location
    raise EngineError(
        "student_incompatible",
        f"student '{named.name}' ({source.kind}) is not a transformers model; task needs a "
        "save_pretrained directory, a hub id or a config override",
    )


def load_pretrained_student(
    named: NamedStudent,
    teacher: PreTrainedModel,
    task: Task,
    data: TaskData,
    *,
    file_root: Path | None,
    trust_remote_code: bool,
    attn_implementation: str,
    own_tokenizer: bool = False,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A registry/hub/local student with the task's head; its tokenizer (when it has one) must match.

    `own_tokenizer` (causal-lm with sequence_kd: no logits are compared): another tokenizer is kept in
    data.info["student_tokenizer"] instead, and the adapter re-tokenises the data with it.
    """
    location = _student_location(named, file_root)
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "attn_implementation": attn_implementation,
        "output_loading_info": True,
        "weights_only": True,
    }
    if task == Task.sequence_classification:
        kwargs["num_labels"] = data.num_labels
        kwargs["ignore_mismatched_sizes"] = True
    try:
        model, info = AUTO_CLASSES[task].from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(
            "student_not_found", f"student '{named.name}' could not be loaded from '{location}': {exc}"
        ) from exc
    missing = [str(k) for k in info.get("missing_keys", [])]
    missing += [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    notes: dict[str, Any] = {"initialised_from": "pretrained", "location": location}
    notes["new_head"] = bool(missing)
    if missing:
        notes["new_head_keys"] = sorted(missing)[:8]
    try:
        student_tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        student_tokenizer = None  # a bare model directory: it reads the teacher's tokens
    teacher_tokenizer = data.info.get("tokenizer")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        difference = _vocabulary_difference(teacher_tokenizer, student_tokenizer)
        if difference is not None and own_tokenizer:
            data.info["student_tokenizer"] = student_tokenizer
            notes["tokenizer"] = f"its own ({difference})"
        elif difference is not None:
            raise EngineError(
                "student_incompatible",
                f"student '{named.name}' has another vocabulary than the teacher ({difference}); the "
                "student must read the teacher's tokens and, for token-level KD, predict over them; "
                "for causal-lm, training_config.sequence_kd trains on the teacher's generated text instead "
                "(no logits) and takes a student with its own tokenizer",
            )
    if model.config.pad_token_id is None and teacher.config.pad_token_id is not None:
        model.config.pad_token_id = teacher.config.pad_token_id
    return model, notes


def overridden_config(teacher: PreTrainedModel, overrides: dict[str, Any]) -> PretrainedConfig:
    """The teacher's config with `overrides` applied; unknown or frozen fields refused by name."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise EngineError(
            "student_incompatible",
            f"student config overrides {unknown} are not fields of the teacher's {config.model_type} config",
        )
    frozen = sorted(k for k in overrides if k in FROZEN_FIELDS)
    if frozen:
        raise EngineError(
            "student_incompatible",
            f"student config overrides may not change {frozen}: the student reads the teacher's tokens "
            "and predicts the same labels",
        )
    for key, value in overrides.items():
        current = getattr(config, key)
        if (
            current is not None
            and not isinstance(value, type(current))
            and not (isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool))
        ):
            raise EngineError(
                "student_incompatible",
                f"student config override {key}={value!r}: the teacher's value is a "
                f"{type(current).__name__} ({current!r})",
            )
        setattr(config, key, value)
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    if hidden % heads:
        raise EngineError(
            "student_incompatible",
            f"student hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
            "override num_attention_heads too",
        )
    config._attn_implementation = getattr(teacher.config, "_attn_implementation", None) or "eager"
    return config


def config_student(
    named: NamedStudent, teacher: PreTrainedModel, *, seed: int
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The teacher's class with overridden config, initialised from the teacher where shapes allow."""
    config = overridden_config(teacher, named.overrides)
    torch.manual_seed(seed)
    try:
        student = type(teacher)(config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise EngineError(
            "student_incompatible", f"student config overrides {named.overrides} give no model: {exc}"
        ) from exc
    counts = initialise_from_teacher(student, teacher)
    notes: dict[str, Any] = {
        "initialised_from": "teacher",
        "overrides": dict(named.overrides),
        "init_tensors": counts,
        "new_head": False,
    }
    return student, notes


def check_student(
    student: PreTrainedModel, teacher: PreTrainedModel, task: Task, spec: JobSpec, data: TaskData
) -> dict[str, Any]:
    """Compatibility checks before training; returns the notes for the results."""
    s_config, t_config = student.config, teacher.config
    tokenizer = data.info.get("tokenizer")
    real = len(tokenizer) if tokenizer is not None else None
    # The same tokenizer with embedding rows padded differently (rounded up): logits are cut to the
    # tokenizer's `real` ids in the adapter's forward, so only ids no token has differ.
    padded_alike = real is not None and min(int(s_config.vocab_size), int(t_config.vocab_size)) >= real
    own_tokenizer = data.info.get("student_tokenizer") is not None  # sequence_kd: no logits compared
    if int(s_config.vocab_size) != int(t_config.vocab_size) and not padded_alike and not own_tokenizer:
        raise EngineError(
            "student_incompatible",
            f"the student's vocabulary has {s_config.vocab_size} tokens, the teacher's "
            f"{t_config.vocab_size}; "
            "the student must read the teacher's tokens (and predict over them for token-level KD)",
        )
    if task == Task.sequence_classification and s_config.num_labels != data.num_labels:
        raise EngineError(
            "student_incompatible",
            f"the student predicts {s_config.num_labels} labels, the data has {data.num_labels}",
        )
    longest = 0
    for split in (data.train, data.val, data.test):
        if isinstance(split, TensorDictDataset) and "input_ids" in split.tensors:
            longest = max(longest, int(split.tensors["input_ids"].shape[1]))
    positions = getattr(s_config, "max_position_embeddings", None)
    if positions is not None and longest > int(positions):
        raise EngineError(
            "student_incompatible",
            f"the student takes at most {positions} tokens, the data has sequences of {longest}; "
            f"lower training_config.max_seq_length to {positions}",
        )
    s_layers, t_layers = int(s_config.num_hidden_layers), int(t_config.num_hidden_layers)
    mapping = spec.training_config.layer_mapping
    if mapping is not None and (len(mapping) != s_layers + 1 or max(mapping) > t_layers):
        raise EngineError(
            "student_incompatible",
            f"training_config.layer_mapping {mapping} needs {s_layers + 1} entries (embeddings, then each "
            f"of the student's {s_layers} layers), each a teacher hidden state 0..{t_layers}",
        )
    used = mapping if mapping is not None else layer_mapping(s_layers + 1, t_layers + 1)
    return {
        "architecture": type(student).__name__,
        "layers": s_layers,
        "hidden_size": int(s_config.hidden_size),
        "num_attention_heads": int(s_config.num_attention_heads),
        "teacher_layers": t_layers,
        "teacher_hidden_size": int(t_config.hidden_size),
        "layer_mapping": list(used),
        "projected": int(s_config.hidden_size) != int(t_config.hidden_size),
        "parameters": count_parameters(student),
    }


def build_named_hf_student(
    named: NamedStudent,
    teacher: PreTrainedModel,
    task: Task,
    spec: JobSpec,
    data: TaskData,
    *,
    file_root: Path | None,
    trust_remote_code: bool,
    attn_implementation: str,
) -> BuiltStudent:
    """Load or build the named student, check it against the teacher, return it on CPU with notes."""
    if named.kind == "config":
        model, notes = config_student(named, teacher, seed=spec.training_config.seed)
    else:
        model, notes = load_pretrained_student(
            named,
            teacher,
            task,
            data,
            file_root=file_root,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            own_tokenizer=task == Task.causal_lm and spec.training_config.sequence_kd,
        )
    notes |= check_student(model, teacher, task, spec, data)
    return BuiltStudent(model=model.cpu(), notes=notes)
