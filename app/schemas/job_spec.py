"""The distillation job spec: one pydantic model shared by the REST API, the CLI runner and the workers.

Importable without torch. Field names follow the seed (`teacher_model_name`, `target_compression`,
`distillation_method`, `training_config`, `dataset_config`). Unknown fields are rejected everywhere.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DistillationMethod(StrEnum):
    response = "response_distillation"
    feature = "feature_distillation"
    attention = "attention_distillation"
    progressive = "progressive_distillation"


class Task(StrEnum):
    classification = "classification"
    sequence_classification = "sequence-classification"
    causal_lm = "causal-lm"
    masked_lm = "masked-lm"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TeacherCache(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


class Selection(StrEnum):
    """Which epoch of the last stage is delivered: the best on the validation split, or the last one."""

    best_validation = "best_validation"
    last = "last"


class LMLoss(StrEnum):
    """Token-level divergence of language-model KD (teacher p, student q)."""

    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    skew_kl = "skew_kl"
    tvd = "tvd"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageSchedule(_Strict):
    """How temperature and alpha change from one progressive stage to the next (seed: T +1, alpha -0.1)."""

    temperature_step: float = Field(strict=True, default=1.0, ge=-9, le=9)
    alpha_step: float = Field(strict=True, default=-0.1, ge=-1, le=1)


class TrainingConfig(_Strict):
    epochs: int = Field(
        strict=True, default=10, ge=1, le=1000, description="Epochs (per stage for progressive)."
    )
    batch_size: int = Field(strict=True, default=64, ge=1, le=65536)
    learning_rate: float = Field(strict=True, default=1e-3, gt=0, le=1.0)
    weight_decay: float = Field(strict=True, default=0.01, ge=0, le=1.0)
    temperature: float = Field(
        strict=True,
        default=4.0,
        ge=1.0,
        le=10.0,
        description="Softmax temperature, 1-10 (the seed warns above 10).",
    )
    alpha: float = Field(
        strict=True, default=0.7, ge=0.0, le=1.0, description="Weight of the KD term vs labels."
    )
    feature_weight: float = Field(strict=True, default=0.1, ge=0.0, le=100.0)
    attention_weight: float = Field(strict=True, default=0.05, ge=0.0, le=100.0)
    num_stages: int = Field(
        strict=True, default=3, ge=1, le=10, description="Stages of progressive distillation."
    )
    stage_schedule: StageSchedule = Field(default_factory=StageSchedule)
    seed: int = Field(strict=True, default=0, ge=0, le=2**31 - 1)
    device: Device = Device.auto
    teacher_cache: TeacherCache = TeacherCache.auto
    teacher_cache_top_k: int = Field(
        strict=True,
        default=64,
        ge=1,
        le=1_000_000,
        description="Logits kept per token in a language-model cache.",
    )
    baseline: bool = Field(
        strict=True, default=False, description="Also train the same student on labels only."
    )
    teacher_finetune_epochs: int = Field(
        strict=True, default=1, ge=0, le=100, description="Epochs to fine-tune a teacher without a task head."
    )
    max_seq_length: int = Field(strict=True, default=128, ge=8, le=8192)
    compile: bool = Field(strict=True, default=False, description="torch.compile the student (CUDA).")
    select: Selection = Field(
        default=Selection.best_validation,
        description="Epoch delivered (and measured in student_accuracy): 'best_validation' (best on the "
        "validation split) or 'last'.",
    )
    # ---- language models (causal-lm, masked-lm): divergence, top-k tail, sequence-level, on-policy KD ----
    lm_loss: LMLoss = Field(
        default=LMLoss.forward_kl,
        description="Token divergence for causal-lm / masked-lm: forward_kl, reverse_kl, jsd (with beta), "
        "skew_kl (with skew), tvd.",
    )
    beta: float = Field(
        strict=True,
        default=0.5,
        ge=0.0,
        le=1.0,
        description="lm_loss=jsd: generalised JSD weight (0 = forward KL, 1 = reverse KL), as TRL's GKD.",
    )
    skew: float = Field(
        strict=True,
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="lm_loss=skew_kl: KL(p || skew*p + (1-skew)*q), as DistiLLM (0 = forward KL).",
    )
    topk_tail: bool = Field(
        strict=True,
        default=False,
        description="Top-k teacher cache: keep the mass outside the k tokens as one extra bin "
        "(instead of renormalising the k).",
    )
    sequence_kd: bool = Field(
        strict=True,
        default=False,
        description="causal-lm: the teacher generates a completion of each training prompt once; the student "
        "trains on them with cross-entropy (no teacher logits: works across tokenizers).",
    )
    on_policy_fraction: float = Field(
        strict=True,
        default=0.0,
        ge=0.0,
        le=1.0,
        description="causal-lm: fraction of batches (TRL's lambda) whose continuations the student samples "
        "from the batch's prompts, scored by the teacher; loss on the generated tokens only.",
    )
    on_policy_temperature: float = Field(
        strict=True, default=1.0, gt=0.0, le=10.0, description="Sampling temperature of on-policy generation."
    )
    max_new_tokens: int = Field(
        strict=True,
        default=32,
        ge=1,
        le=4096,
        description="Tokens generated per prompt by sequence_kd (teacher) and on-policy batches (student).",
    )


class BuiltinDataset(_Strict):
    kind: Literal["builtin"] = "builtin"
    name: Literal["digits"] = "digits"


class FileDataset(_Strict):
    kind: Literal["file"] = "file"
    path: str = Field(min_length=1, max_length=4096, description="CSV or JSONL under the allowed root.")
    text_column: str = Field(default="text", min_length=1, max_length=256)
    label_column: str = Field(default="label", min_length=1, max_length=256)


class UploadedDataset(_Strict):
    kind: Literal["uploaded"] = "uploaded"
    dataset_id: str = Field(min_length=1, max_length=64)


class HubDataset(_Strict):
    kind: Literal["hub"] = "hub"
    name: str = Field(min_length=1, max_length=256)
    subset: str | None = Field(default=None, max_length=256)
    split: str = Field(default="train", max_length=64)
    text_column: str = Field(default="text", min_length=1, max_length=256)
    label_column: str = Field(default="label", min_length=1, max_length=256)


DatasetConfig = Annotated[
    BuiltinDataset | FileDataset | UploadedDataset | HubDataset, Field(discriminator="kind")
]


class Compression(_Strict):
    prune_amount: float = Field(
        strict=True, default=0.0, ge=0.0, le=0.95, description="Global magnitude pruning."
    )
    quantize: Literal["none", "int8"] = "none"


class JobSpec(_Strict):
    """What a client asks for: a teacher, how hard to compress it, how, and on which data."""

    teacher_model_name: str = Field(
        min_length=1,
        max_length=512,
        description="A registered teacher name (GET /distillation/teachers).",
        examples=["digits-cnn"],
    )
    target_compression: float = Field(
        strict=True,
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Student parameters / teacher parameters, strictly between 0 and 1.",
    )
    distillation_method: DistillationMethod = DistillationMethod.response
    task: Task = Task.classification
    training_config: TrainingConfig = Field(default_factory=TrainingConfig)
    dataset_config: DatasetConfig = Field(default_factory=BuiltinDataset)
    compression: Compression = Field(default_factory=Compression)

    @model_validator(mode="after")
    def _check_supported(self) -> JobSpec:
        if self.task == Task.classification and self.dataset_config.kind == "hub":
            raise ValueError("task 'classification' takes the builtin 'digits' dataset or a file/upload")
        if isinstance(self.dataset_config, BuiltinDataset) and self.task != Task.classification:
            raise ValueError(f"the builtin 'digits' dataset is for task 'classification', not '{self.task}'")
        return self

    @model_validator(mode="after")
    def _check_language_model_options(self) -> JobSpec:
        config = self.training_config
        language_model = self.task in (Task.causal_lm, Task.masked_lm)
        if config.lm_loss != LMLoss.forward_kl and not language_model:
            raise ValueError(f"training_config.lm_loss is for causal-lm and masked-lm, not '{self.task}'")
        for name in ("sequence_kd", "on_policy_fraction"):
            if getattr(config, name) and self.task != Task.causal_lm:
                raise ValueError(f"training_config.{name} is for task causal-lm, not '{self.task}'")
        if config.sequence_kd and config.on_policy_fraction:
            raise ValueError(
                "training_config.sequence_kd trains on teacher-generated text without teacher logits; "
                "on_policy_fraction needs the teacher's logits: choose one"
            )
        if config.sequence_kd and self.distillation_method != DistillationMethod.response:
            raise ValueError("training_config.sequence_kd needs distillation_method response_distillation")
        return self
