"""Transformer teachers and students: load from a directory or the hub, derive a smaller student from it."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.core.model_files import (
    UNSAFE_MODEL_FILE,
    conversion_hint,
    describe_unsafe,
    has_safetensors,
    unsafe_model_files,
)
from app.core.paths import PathKind
from app.schemas.job_spec import Task
from app.schemas.teachers import TeacherSource, TeacherSourceKind
from workers.distill.contract import EngineError, resolve_local_path

# The auto class that gives each task its head.
AUTO_CLASSES: dict[Task, Any] = {
    Task.sequence_classification: AutoModelForSequenceClassification,
    Task.causal_lm: AutoModelForCausalLM,
    Task.masked_lm: AutoModelForMaskedLM,
}

# Config families the student builder understands (BERT/RoBERTa style and GPT-2 style).
_SUPPORTED_MODEL_TYPES = ("bert", "roberta", "distilbert", "electra", "xlm-roberta", "gpt2")
_LAYER_INDEX = re.compile(r"\.(layer|h|layers)\.(\d+)\.")


@dataclass
class LoadedTeacher:
    """A transformer teacher, its tokenizer, and whether its task head still needs training."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    needs_finetune: bool
    missing_head_keys: list[str]


def teacher_location(source: TeacherSource, file_root: Path | None) -> str:
    """Where from_pretrained should look: a checked local directory or a hub id."""
    if source.kind == TeacherSourceKind.local:
        directory = resolve_local_path(
            source.location,
            file_root,
            kind=PathKind.any,
            what=f"teacher '{source.name}' directory",
            missing_code="teacher_not_found",
        )
        if not (directory / "config.json").is_file():
            raise EngineError(
                "teacher_not_found",
                f"teacher '{source.name}': '{directory.name}' has no config.json; give a save_pretrained "
                "directory (config.json + model.safetensors)",
            )
        unsafe = unsafe_model_files(directory)  # read as opcodes, never unpickled
        if unsafe:
            raise EngineError(UNSAFE_MODEL_FILE, f"teacher '{source.name}': {describe_unsafe(unsafe)}")
        return str(directory)
    if source.kind == TeacherSourceKind.hub:
        return source.location
    raise EngineError("unsupported", f"teacher '{source.name}' ({source.kind}) is not a transformers model")


def load_tokenizer(location: str, *, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer (students share it); a pad token is set for GPT-2 style vocabularies."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EngineError(
            "teacher_not_found", f"no tokenizer could be loaded from '{location}': {exc}"
        ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise EngineError(
                "teacher_invalid", f"tokenizer at '{location}' has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_teacher(
    source: TeacherSource,
    task: Task,
    *,
    num_labels: int | None,
    file_root: Path | None,
    trust_remote_code: bool = False,
    attn_implementation: str = "eager",
) -> LoadedTeacher:
    """Load a teacher with the task's head; safetensors preferred, pickles only with weights_only=True."""
    location = teacher_location(source, file_root)
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "attn_implementation": attn_implementation,
        "output_loading_info": True,
        "weights_only": True,
    }
    if source.kind == TeacherSourceKind.local and has_safetensors(Path(location)):
        kwargs["use_safetensors"] = True  # a pickle beside the safetensors weights is never opened
    if task == Task.sequence_classification:
        if num_labels is None:
            raise EngineError("dataset_invalid", "sequence-classification needs labelled data")
        kwargs["num_labels"] = num_labels
        # A head trained for a different label count is replaced (and then fine-tuned).
        kwargs["ignore_mismatched_sizes"] = True
    try:
        model, info = AUTO_CLASSES[task].from_pretrained(location, **kwargs)
    except pickle.UnpicklingError as exc:  # weights-only loading refused a global (e.g. a hub pickle)
        reason = str(exc).strip().splitlines()[-1][:300]
        raise EngineError(
            UNSAFE_MODEL_FILE,
            f"teacher '{source.name}': a weight file is a pickle that the weights-only loader refused "
            f"({reason}); {conversion_hint('the .bin file')}",
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(
            "teacher_not_found", f"teacher '{source.name}' could not be loaded from '{location}': {exc}"
        ) from exc
    tokenizer = load_tokenizer(location, trust_remote_code=trust_remote_code)
    missing = [str(k) for k in info.get("missing_keys", [])]
    missing += [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    # Only a classification head can be trained here; a language-model teacher must bring its own head.
    needs_finetune = task == Task.sequence_classification and bool(missing)
    if task != Task.sequence_classification and missing:
        raise EngineError(
            "teacher_invalid",
            f"teacher '{source.name}' has no trained {task} head (missing {', '.join(sorted(missing)[:4])}); "
            f"give a checkpoint saved from a {AUTO_CLASSES[task].__name__.removeprefix('Auto')}-style model",
        )
    return LoadedTeacher(
        model=model, tokenizer=tokenizer, needs_finetune=needs_finetune, missing_head_keys=missing
    )


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _dims(config: PretrainedConfig) -> tuple[int, int, int, int]:
    """(layers, hidden, heads, intermediate) of a BERT- or GPT-2-style config."""
    layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    if config.model_type == "gpt2":
        inner = config.n_inner
        intermediate = int(inner) if inner is not None else 4 * hidden
    else:
        intermediate = int(config.intermediate_size)
    return layers, hidden, heads, intermediate


def student_config(
    teacher_config: PretrainedConfig, *, layers: int, hidden: int, heads: int, intermediate: int
) -> PretrainedConfig:
    """A copy of the teacher's config with the student's depth and width."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    if config.model_type == "gpt2":
        config.n_layer, config.n_embd, config.n_head, config.n_inner = layers, hidden, heads, intermediate
    else:
        config.num_hidden_layers, config.hidden_size = layers, hidden
        config.num_attention_heads, config.intermediate_size = heads, intermediate
    config._attn_implementation = getattr(teacher_config, "_attn_implementation", None) or "eager"
    return config


def _meta_param_count(model_class: type[PreTrainedModel], config: PretrainedConfig) -> int:
    """Parameters of a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = model_class(config)
    return count_parameters(model)


def plan_student(teacher: PreTrainedModel, target_compression: float) -> tuple[PretrainedConfig, int, int]:
    """Choose (config, student params, teacher params) nearest the target ratio.

    Keeps the teacher's width and drops layers when that reaches the target (DistilBERT: best init);
    otherwise narrows hidden size (hidden divisible by heads, the teacher's hidden/intermediate ratio kept).
    """
    config = teacher.config
    if config.model_type not in _SUPPORTED_MODEL_TYPES:
        raise EngineError(
            "unsupported",
            f"student derivation supports {', '.join(_SUPPORTED_MODEL_TYPES)} configs, "
            f"not '{config.model_type}'",
        )
    model_class = type(teacher)
    teacher_params = count_parameters(teacher)
    target = target_compression * teacher_params
    layers_t, hidden_t, heads_t, inter_t = _dims(config)
    head_dim = hidden_t // heads_t
    ratio = inter_t / hidden_t

    # Params are affine in depth and quadratic in width (attention heads do not change the count):
    # P(L, h) = base(h) + L * per_layer(h). Both quadratics are fitted from 6 models on the meta device.
    def count(layers: int, hidden: int) -> int:
        inter = max(1, round(hidden * ratio))
        shape = student_config(config, layers=layers, hidden=hidden, heads=1, intermediate=inter)
        return _meta_param_count(model_class, shape)

    samples = sorted({hidden_t, max(1, hidden_t // 2), max(1, hidden_t // 4)})
    ones = [count(1, h) for h in samples]
    twos = [count(2, h) for h in samples]
    degree = len(samples) - 1
    per_layer_fit = np.polyfit(samples, [t - o for o, t in zip(ones, twos, strict=True)], degree)
    base_fit = np.polyfit(samples, [2 * o - t for o, t in zip(ones, twos, strict=True)], degree)

    widths: set[tuple[int, int]] = set()
    for head_count in range(1, heads_t + 1):
        for dim in {head_dim, max(1, head_dim // 2), max(1, head_dim // 4)}:
            widths.add((head_count * dim, head_count))
    best: tuple[float, int, int, int] | None = None
    pref_layers = max(1, round(layers_t / 2))
    for hidden, heads in sorted(widths, reverse=True):
        if hidden > hidden_t:
            continue
        per_layer = float(np.polyval(per_layer_fit, hidden))
        base = float(np.polyval(base_fit, hidden))
        max_layers = layers_t - 1 if hidden == hidden_t else layers_t
        for layers in range(1, max_layers + 1):
            error = abs(base + layers * per_layer - target) / target
            # Teacher width wins outright when close (copyable layers); else prefer moderate depth.
            score = error + (0.0 if hidden == hidden_t and error <= 0.1 else 0.05)
            score += 0.02 * abs(layers - pref_layers) / layers_t
            if best is None or score < best[0]:
                best = (score, layers, hidden, heads)
    if best is None:
        raise EngineError("unsupported", "no student configuration could be derived from this teacher")
    _, layers, hidden, heads = best
    chosen = student_config(
        config, layers=layers, hidden=hidden, heads=heads, intermediate=max(1, round(hidden * ratio))
    )
    student_params = _meta_param_count(model_class, chosen)
    reached = student_params / teacher_params
    if abs(reached - target_compression) / target_compression > 0.25:
        raise EngineError(
            "unsupported",
            f"target_compression {target_compression} is out of reach for this teacher: the nearest student "
            f"has ratio {reached:.4f} (more than 25% off; the shared vocabulary embeddings set a floor)",
        )
    return chosen, student_params, teacher_params


def _teacher_key(student_key: str, layer_map: dict[int, int]) -> str:
    """The teacher parameter a student parameter is initialised from (layer index remapped)."""
    return _LAYER_INDEX.sub(lambda m: f".{m.group(1)}.{layer_map[int(m.group(2))]}.", student_key, count=1)


def layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer i takes teacher layer i * L_t // L_s (every other layer when halving, as DistilBERT)."""
    return {i: i * teacher_layers // student_layers for i in range(student_layers)}


@torch.no_grad()
def initialise_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel) -> dict[str, int]:
    """Copy teacher weights into the student: whole tensors where shapes match, leading slices otherwise.

    Fused GPT-2 qkv projections are not sliced (a leading slice would mix q with k); they keep random init.
    Returns counts {'copied', 'sliced', 'random'} of student tensors.
    """
    mapping = layer_map(int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers))
    teacher_state = teacher.state_dict()
    counts = {"copied": 0, "sliced": 0, "random": 0}
    for key, tensor in student.state_dict().items():
        source = teacher_state.get(_teacher_key(key, mapping))
        if source is None or source.dim() != tensor.dim():
            counts["random"] += 1
        elif source.shape == tensor.shape:
            tensor.copy_(source)
            counts["copied"] += 1
        elif all(s >= t for s, t in zip(source.shape, tensor.shape, strict=True)) and "c_attn" not in key:
            tensor.copy_(source[tuple(slice(0, n) for n in tensor.shape)])
            counts["sliced"] += 1
        else:
            counts["random"] += 1
    return counts


def build_hf_student(teacher: PreTrainedModel, target_compression: float, *, seed: int) -> PreTrainedModel:
    """A smaller model of the teacher's class and vocabulary, initialised from its layers."""
    config, _, _ = plan_student(teacher, target_compression)
    torch.manual_seed(seed)
    student = type(teacher)(config)
    initialise_from_teacher(student, teacher)
    nn.Module.to(student, next(teacher.parameters()).device)
    return student


def compression_summary(student: PreTrainedModel, teacher: PreTrainedModel) -> dict[str, float]:
    """Depth/width of both models and the parameter ratio reached (for events and results)."""
    s_layers, s_hidden, s_heads, s_inter = _dims(student.config)
    t_layers, t_hidden, _, _ = _dims(teacher.config)
    return {
        "student_layers": s_layers,
        "student_hidden": s_hidden,
        "student_heads": s_heads,
        "student_intermediate": s_inter,
        "teacher_layers": t_layers,
        "teacher_hidden": t_hidden,
        "ratio": count_parameters(student) / count_parameters(teacher),
    }
