"""The distillation job spec: one pydantic model shared by the REST API, the CLI runner and the workers.

Importable without torch. Field names follow the seed (`teacher_model_name`, `target_compression`,
`distillation_method`, `training_config`, `dataset_config`). Unknown fields are rejected everywhere.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.core.paths import check_path_text
from app.schemas.hub_ids import HubRepoId


def _plain_path(text: str) -> str:
    check_path_text(text)  # PathRefused is a ValueError: a 422 naming the field
    return text


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
    image_classification = "image-classification"


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


# Ranks of one job on one node (torchrun's per-node ceiling in practice: 8-16 GPUs).
MAX_WORLD_SIZE = 16


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
    layer_mapping: list[Annotated[int, Field(strict=True, ge=0, le=4096)]] | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Feature/attention KD: the teacher layer each student layer learns from, one entry per "
        "student layer (hidden states count the embedding output as layer 0); default: spread uniformly.",
    )
    select: Selection = Field(
        default=Selection.last,
        description="Epoch delivered (and measured in student_accuracy): 'last' (the default: it scored "
        "higher on test over 19 digits runs, see bench/README.md) or 'best_validation' (best on the "
        "validation split).",
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
    world_size: int = Field(
        strict=True,
        default=1,
        ge=1,
        le=MAX_WORLD_SIZE,
        description="Processes (ranks) training this job together on one worker: one per GPU on CUDA "
        "(nccl), CPU processes otherwise (gloo). batch_size is the global batch and must be divisible by "
        "it. The job waits in the queue until a worker with this many devices is live.",
    )

    @model_validator(mode="after")
    def _check_world_size(self) -> TrainingConfig:
        if self.batch_size % self.world_size:
            raise ValueError(
                f"training_config.batch_size ({self.batch_size}) is the global batch: it must be divisible "
                f"by training_config.world_size ({self.world_size})"
            )
        return self

    max_trials: int = Field(
        strict=True,
        default=8,
        ge=1,
        le=50,
        description="target_retention: the most student sizes the search trains before the final run.",
    )
    max_search_seconds: float = Field(
        strict=True,
        default=3600.0,
        gt=0,
        le=7 * 86400,
        description="target_retention: no new trial starts once the search has run this long (or would, "
        "at the mean trial's duration), and a trial still running then is cut short (not counted).",
    )
    search_epochs: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        le=1000,
        description="target_retention: epochs of each trial (default: the job's epochs, so a trial is "
        "the final run's procedure). Fewer is faster; trials are then not extrapolated, only "
        "conservative (a shorter run scores lower), and the final run is measured anew.",
    )
    search_tolerance: float = Field(
        strict=True,
        default=0.25,
        gt=0.0,
        le=10.0,
        description="target_retention: the search stops when the smallest size meeting the target and the "
        "largest missing it differ by at most this factor (0.25: sizes within 25%).",
    )
    seeds: list[Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]] | None = Field(
        default=None,
        min_length=1,
        max_length=10,
        description="Train the final student (and the baseline) once per seed and report mean and "
        "spread (results.seed_summary); `seed` is seeds[0], the first seed's student is delivered unless "
        "seed_select says otherwise.",
    )
    seed_select: Literal["first", "best_validation"] = Field(
        default="first",
        description="With seeds: deliver the first seed's student, or the seed's whose delivered epoch "
        "scored best on the validation split (said in results.seed_summary.delivered_by).",
    )

    @model_validator(mode="after")
    def _check_seeds(self) -> TrainingConfig:
        if self.seeds is not None:
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError("training_config.seeds: every seed must be different")
            if "seed" in self.model_fields_set and self.seed != self.seeds[0]:
                raise ValueError(
                    f"training_config.seed ({self.seed}) must be seeds[0] ({self.seeds[0]}) when seeds "
                    "are given (leave seed out)"
                )
            self.seed = self.seeds[0]
        return self


_COLUMN = Field(min_length=1, max_length=256)


class BuiltinSource(_Strict):
    kind: Literal["builtin"] = "builtin"
    name: Literal["digits"] = "digits"


class FileSource(_Strict):
    kind: Literal["file"] = "file"
    path: Annotated[str, AfterValidator(_plain_path)] = Field(
        min_length=1,
        max_length=4096,
        description="Relative to the file root (ALLOWED_FILE_ROOT; refused when none is set): a CSV, TSV or "
        "JSONL file, a Parquet file, or a directory written by datasets' save_to_disk.",
    )
    text_column: str = Field(default="text", min_length=1, max_length=256)
    label_column: str = Field(default="label", min_length=1, max_length=256)
    feature_columns: list[Annotated[str, _COLUMN]] | None = Field(
        default=None,
        min_length=1,
        max_length=65536,
        description="Task 'classification': the numeric input columns, in order (default: every column "
        "but the label).",
    )


class UploadedSource(_Strict):
    kind: Literal["uploaded"] = "uploaded"
    dataset_id: str = Field(min_length=1, max_length=64)


class HubSource(_Strict):
    kind: Literal["hub"] = "hub"
    name: HubRepoId = Field(
        min_length=1, max_length=256, description="A hub dataset id, 'name' or 'org/name', e.g. 'imdb'."
    )
    subset: str | None = Field(default=None, max_length=256, description="The configuration name.")
    split: str = Field(default="train", min_length=1, max_length=64)
    revision: str | None = Field(default=None, min_length=1, max_length=128)
    text_column: str = Field(default="text", min_length=1, max_length=256)
    label_column: str = Field(default="label", min_length=1, max_length=256)
    feature_columns: list[Annotated[str, _COLUMN]] | None = Field(
        default=None, min_length=1, max_length=65536, description="As for file datasets."
    )


# A held-out split given by the client: any kind of the main dataset but the builtin one.
DatasetSource = Annotated[FileSource | UploadedSource | HubSource, Field(discriminator="kind")]


class _HeldOut(_Strict):
    """Optional validation and test sets; without them both are carved from the data deterministically."""

    validation: DatasetSource | None = Field(
        default=None,
        description="The validation set (epoch selection); default: carved from the data.",
    )
    test: DatasetSource | None = Field(
        default=None,
        description="The test set every reported figure is measured on; default: carved from the data.",
    )


class BuiltinDataset(_HeldOut, BuiltinSource):
    pass


class FileDataset(_HeldOut, FileSource):
    pass


class UploadedDataset(_HeldOut, UploadedSource):
    pass


class HubDataset(_HeldOut, HubSource):
    pass


DatasetConfig = Annotated[
    BuiltinDataset | FileDataset | UploadedDataset | HubDataset, Field(discriminator="kind")
]

# ---- the student ------------------------------------------------------------------------------------

_OVERRIDE_KEY = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
OverrideValue = (
    Annotated[bool, Field(strict=True)]
    | Annotated[int, Field(strict=True, ge=-1, le=10_000_000)]
    | Annotated[float, Field(strict=True, ge=-1e6, le=1e6, allow_inf_nan=False)]
    | Annotated[str, Field(max_length=128)]
)


class DerivedStudent(_Strict):
    """Built by the engine from the teacher and target_compression (the default)."""

    kind: Literal["derived"] = "derived"


class RegistryStudent(_Strict):
    """A registered model (GET /distillation/teachers: the registry holds models, teacher or student)."""

    kind: Literal["registry"]
    name: str = Field(min_length=1, max_length=512)


class HubStudent(_Strict):
    """A Hugging Face hub id, loaded with from_pretrained (e.g. 'distilbert-base-uncased')."""

    kind: Literal["hub"]
    name: HubRepoId = Field(min_length=1, max_length=256)


class LocalStudent(_Strict):
    """A directory under the allowed root: save_pretrained output, or safetensors + student_config.json."""

    kind: Literal["local"]
    path: Annotated[str, AfterValidator(_plain_path)] = Field(min_length=1, max_length=4096)


class ConfigStudent(_Strict):
    """The teacher's architecture with some config fields changed, initialised from the teacher."""

    kind: Literal["config"]
    overrides: dict[Annotated[str, Field(pattern=_OVERRIDE_KEY)], OverrideValue] = Field(
        min_length=1,
        max_length=32,
        description="Config fields to change, e.g. {'num_hidden_layers': 2, 'hidden_size': 128} "
        "(transformers) or {'hidden_size': 64, 'num_hidden_layers': 1} (MLP).",
    )


StudentSpec = Annotated[
    DerivedStudent | RegistryStudent | HubStudent | LocalStudent | ConfigStudent,
    Field(discriminator="kind"),
]

DEFAULT_TARGET_COMPRESSION = 0.1

# ---- images (task image-classification) ------------------------------------------------------------


class ImagePreprocessing(_Strict):
    """How images become the teacher's input; given in the job for a `.pt2` teacher (a transformers
    teacher brings its own in preprocessor_config.json, which this overrides when set)."""

    size: list[Annotated[int, Field(strict=True, ge=8, le=4096)]] = Field(
        min_length=2, max_length=2, description="Model input [height, width] in pixels."
    )
    resize_shortest_edge: Annotated[int, Field(strict=True, ge=8, le=8192)] | None = Field(
        default=None,
        description="Resize the shorter side to this, then centre-crop to size (default: resize to size).",
    )
    rescale_factor: float = Field(strict=True, default=1 / 255, gt=0, le=1.0)
    mean: list[Annotated[float, Field(strict=True, ge=-10, le=10)]] = Field(
        default_factory=lambda: [0.5, 0.5, 0.5], min_length=1, max_length=4
    )
    std: list[Annotated[float, Field(strict=True, gt=0, le=100)]] = Field(
        default_factory=lambda: [0.5, 0.5, 0.5], min_length=1, max_length=4
    )
    channels: Literal[1, 3] = Field(default=3, description="3: RGB, 1: greyscale.")

    @model_validator(mode="after")
    def _check_lengths(self) -> ImagePreprocessing:
        if len(self.mean) not in (1, self.channels) or len(self.std) not in (1, self.channels):
            raise ValueError(f"mean and std need 1 or {self.channels} values (one per channel)")
        return self


class ImageAugmentation(_Strict):
    """Training-split augmentation (val/test never); the teacher-output cache is off when it is on."""

    random_resized_crop: bool = Field(strict=True, default=False)
    crop_scale: list[Annotated[float, Field(strict=True, gt=0, le=1)]] = Field(
        default_factory=lambda: [0.08, 1.0], min_length=2, max_length=2, description="Area fraction range."
    )
    horizontal_flip: bool = Field(strict=True, default=False)

    @property
    def enabled(self) -> bool:
        return self.random_resized_crop or self.horizontal_flip


class ImageConfig(_Strict):
    """Options of task image-classification."""

    image_column: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Column of CSV/JSONL image paths (default 'path') or of a datasets Image feature "
        "(default 'image'); image folders (class/*.png|jpg) need none.",
    )
    preprocessing: ImagePreprocessing | None = None
    augmentation: ImageAugmentation = Field(default_factory=ImageAugmentation)


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
    target_compression: float | None = Field(
        strict=True,
        default=None,
        gt=0.0,
        lt=1.0,
        description="Student parameters / teacher parameters, strictly between 0 and 1 (default 0.1 for "
        "a derived student; optional with a named one, whose reached ratio is reported).",
    )
    target_retention: float | None = Field(
        strict=True,
        default=None,
        gt=0.0,
        le=10.0,
        description="Instead of target_compression: the student's test metric / the teacher's to keep "
        "(teacher/student for perplexity), e.g. 0.99. The engine searches the derived student's size "
        "(training_config.max_trials, max_search_seconds) and delivers the smallest that keeps it; "
        "results.target_met says whether it did.",
    )
    student: StudentSpec = Field(
        default_factory=DerivedStudent,
        description="derived (default: built from target_compression) | registry | hub | local | config.",
    )
    distillation_method: DistillationMethod = DistillationMethod.response
    task: Task = Task.classification
    training_config: TrainingConfig = Field(default_factory=TrainingConfig)
    dataset_config: DatasetConfig = Field(default_factory=BuiltinDataset)
    compression: Compression = Field(default_factory=Compression)
    image_config: ImageConfig | None = Field(
        default=None, description="Task image-classification: image column, preprocessing, augmentation."
    )

    @model_validator(mode="after")
    def _check_world_size(self) -> JobSpec:
        if self.training_config.world_size > 1 and self.target_retention is not None:
            # The size search decides by wall time per trial, which ranks would not agree on.
            raise ValueError(
                "target_retention (the student size search) runs in one process: leave "
                "training_config.world_size at 1, or give target_compression instead"
            )
        return self

    @model_validator(mode="after")
    def _check_supported(self) -> JobSpec:
        if self.target_retention is not None:
            if self.target_compression is not None:
                raise ValueError(
                    "target_retention and target_compression are exclusive: give the retention to keep "
                    "(the size is searched) or the size, not both"
                )
            if not isinstance(self.student, DerivedStudent):
                raise ValueError(
                    "target_retention searches the size of a derived student; a "
                    f"'{self.student.kind}' student has its own size (leave target_retention out)"
                )
        elif self.target_compression is None and isinstance(self.student, DerivedStudent):
            self.target_compression = DEFAULT_TARGET_COMPRESSION
        sources: list[FileSource | UploadedSource | HubSource | BuiltinSource] = [self.dataset_config]
        sources += [s for s in (self.dataset_config.validation, self.dataset_config.test) if s is not None]
        if self.task == Task.classification and any(source.kind == "hub" for source in sources):
            raise ValueError(
                "task 'classification' takes the builtin 'digits' dataset or a file/upload "
                "(CSV/JSONL, Parquet or a save_to_disk directory)"
            )
        if self.task != Task.classification:
            for source in sources:
                if getattr(source, "feature_columns", None) is not None:
                    raise ValueError(f"feature_columns is for task 'classification', not '{self.task}'")
        if isinstance(self.dataset_config, BuiltinDataset) and self.task != Task.classification:
            raise ValueError(f"the builtin 'digits' dataset is for task 'classification', not '{self.task}'")
        if self.image_config is not None and self.task != Task.image_classification:
            raise ValueError(f"image_config is for task 'image-classification', not '{self.task}'")
        if self.image_config is not None and self.image_config.augmentation.enabled:
            # Cached teacher outputs describe un-augmented images: an augmented epoch recomputes them.
            if self.training_config.teacher_cache == TeacherCache.on:
                raise ValueError(
                    "training_config.teacher_cache 'on' cannot be used with image_config.augmentation "
                    "(cached teacher outputs are of un-augmented images); use 'auto' or 'off'"
                )
            self.training_config.teacher_cache = TeacherCache.off
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
