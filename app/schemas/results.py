"""Typed results of a distillation job: numbers, not strings, named as the seed names them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class SizePair(_Open):
    teacher: float
    student: float


class LatencyMs(_Open):
    """Milliseconds per forward pass, measured on the job's device."""

    teacher: dict[str, float] = Field(description="{'batch_1': ms, 'batch_64': ms}")
    student: dict[str, float] = Field(description="{'batch_1': ms, 'batch_64': ms}")


class HistoryEntry(_Open):
    stage: int
    epoch: int
    student_accuracy: float
    distillation_loss: float
    student_loss: float
    total_loss: float
    seconds: float


class StageResult(_Open):
    stage: int
    compression_ratio: float
    parameters: int
    best_student_accuracy: float
    temperature: float
    alpha: float


class CompressionStage(_Open):
    """One post-training compression stage, re-measured: 'distilled', 'pruned' or 'int8'."""

    stage: str
    metric: str = Field(description="'accuracy' or 'perplexity'")
    value: float = Field(description="The metric on the test split after this stage")
    size_mb: float = Field(description="Bytes of the stored tensors / 2**20 (int8 weights at 1 byte)")
    latency_ms: dict[str, float] = Field(description="{'batch_1': ms, 'batch_64': ms}")
    device: str
    linear_sparsity: float | None = Field(default=None, description="Fraction of zero Linear weights")


class TrialResult(_Open):
    """One student size the retention search trained (`training_config.search_epochs` epochs).

    The search decides on validation figures only; the test figures are reported, never used to choose.
    Metric fields hold the task metric (see `DistillationResults.metric`), as `student_accuracy` does.
    """

    trial: int = Field(description="1-based, in the order trained")
    compression_ratio: float = Field(description="The size asked for: student / teacher parameters")
    parameters: int = Field(description="Parameters of the student built at that ratio")
    epochs: int = Field(description="Epochs this trial trained (per stage)")
    validation_accuracy: float | None = Field(
        default=None, description="Delivered epoch's metric on the validation split"
    )
    validation_retention: float | None = Field(
        default=None, description="validation_accuracy vs the teacher's validation metric"
    )
    test_accuracy: float | None = Field(default=None, description="Same student on the test split")
    test_retention: float | None = Field(
        default=None, description="test_accuracy vs the teacher's test metric"
    )
    meets_target: bool = Field(description="validation_retention >= target_retention")
    latency_ms: dict[str, float] = Field(
        default_factory=dict, description="{'batch_1': ms, 'batch_64': ms} on the job's device"
    )
    seconds: float = Field(description="Wall seconds of the trial (build, train, evaluate, time)")
    error: str | None = Field(
        default=None,
        description="Why the trial has no figures: no student could be built at this size, or it was cut "
        "short at max_search_seconds (then it does not count as a miss)",
    )


class SearchSummary(_Open):
    """How the retention search went (`results.trials` holds every trial)."""

    target_retention: float
    status: Literal["bracketed", "smallest_size", "impossible", "budget_trials", "budget_seconds"] = Field(
        description="bracketed: a size meeting the target and one missing it within the tolerance; "
        "smallest_size: the smallest buildable student meets it; impossible: the largest size tried "
        "misses it; budget_trials / budget_seconds: the budget ran out first"
    )
    decided_on: Literal["validation"] = "validation"
    trial_epochs: int = Field(description="Epochs per trial (per stage)")
    trials_exact: bool = Field(
        description="True when trials train the job's own epochs (the final run repeats a trial's "
        "procedure); False: shorter trials, whose figures are measured as they are, not extrapolated"
    )
    teacher_validation_accuracy: float
    chosen_trial: int | None = Field(
        default=None,
        description="The trial whose size was trained fully (the smallest meeting the "
        "target, else the best retention found)",
    )
    chosen_compression_ratio: float
    bracket: list[float | None] = Field(
        description="[largest ratio missing the target below the chosen one, smallest ratio meeting it] "
        "(None where not found)"
    )
    tolerance: float
    max_trials: int
    max_search_seconds: float
    trials_used: int
    seconds: float
    final_validation_retention: float | None = Field(
        default=None, description="The fully trained student's validation retention"
    )


class Spread(_Open):
    """Mean and spread of one figure over the seeds (std: sample standard deviation, 0 for one seed)."""

    mean: float
    std: float
    min: float
    max: float


class SeedSummary(_Open):
    """The final student (and baseline) trained once per `training_config.seeds`."""

    seeds: list[int]
    delivered_seed: int = Field(description="The seed whose student is delivered")
    delivered_by: Literal["first_seed", "best_validation"] = Field(
        default="first_seed",
        description="first_seed, or best_validation: the seed whose delivered epoch scored best on "
        "validation",
    )
    per_seed: list[dict[str, Any]] = Field(
        description="{seed, student_accuracy, accuracy_retention, validation_accuracy, baseline_accuracy?, "
        "kd_gain?, parameters, seconds} for each seed; figures on the test split (validation_accuracy on "
        "validation), epoch chosen by `selected_by`"
    )
    student_accuracy: Spread
    accuracy_retention: Spread
    baseline_accuracy: Spread | None = None
    kd_gain: Spread | None = Field(default=None, description="In kd_gain_unit, positive = KD better")


class DistillationResults(_Open):
    """What a finished job measured. Accuracies are fractions in [0, 1]; for causal LMs see `metric`."""

    task: str
    metric: str = Field(default="accuracy", description="'accuracy', or 'perplexity' for language models")
    device: str
    teacher_accuracy: float
    initial_student_accuracy: float
    student_accuracy: float | None = Field(
        default=None,
        description="THE headline: the task metric (see `metric`) of the delivered student (the weights in "
        "student.safetensors / student.pt2) on the test split. Set by every engine run; absent only in "
        "results stored before it existed.",
    )
    selected_by: Literal["best_validation", "last"] | None = Field(
        default=None, description="How the delivered epoch was chosen (training_config.select)"
    )
    selected_epoch: int | None = Field(
        default=None, description="The epoch delivered, within the last distillation stage (1-based)"
    )
    metric_direction: Literal["higher_is_better", "lower_is_better"] = Field(
        default="higher_is_better", description="Whether a larger `metric` is better"
    )
    metric_split: Literal["test"] = Field(
        default="test", description="The split every student/teacher/baseline figure is measured on"
    )
    final_student_accuracy: float = Field(description="The last epoch's student on test (seed name)")
    best_student_accuracy: float = Field(
        description="The best-validation epoch's student on test (seed name)"
    )
    accuracy_retention: float = Field(
        description="Delivered student vs teacher (1.0 = as good; teacher/student for lower-is-better)"
    )
    original_parameters: int
    compressed_parameters: int
    compression_ratio: float
    target_compression: float | None = Field(
        default=None, description="The spec's target ratio (None when a named student set the size)"
    )
    splits: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="Where each split came from: {train|validation|test: {source, rows, given}}; given = "
        "the client's own set (dataset_config.validation/test), else carved from the data. Every figure "
        "is on `metric_split` (test); the delivered epoch is chosen on validation",
    )
    student: dict[str, Any] | None = Field(
        default=None,
        description="The delivered student: kind (derived | registry | hub | local | config), parameters, "
        "compression_ratio reached, and for a named one its architecture, how it was initialised, "
        "whether its head is new, the layer mapping used",
    )
    parameter_reduction: float
    model_size_mb: SizePair
    memory_savings: float
    latency_ms: LatencyMs
    inference_speedup: float
    cost_savings: float
    training_history: list[HistoryEntry]
    stages: list[StageResult] = Field(default_factory=list)
    baseline_accuracy: float | None = Field(
        default=None,
        description="The labels-only baseline student on test, its epoch chosen by the same `selected_by`",
    )
    kd_gain: float | None = Field(
        default=None,
        description="Delivered KD student vs the baseline, positive = KD better: 100 * (student - baseline) "
        "points for accuracy, baseline - student for perplexity (see kd_gain_unit)",
    )
    kd_gain_unit: Literal["points", "perplexity"] | None = Field(
        default=None, description="Unit of kd_gain: 'points' (of accuracy) or 'perplexity'"
    )
    teacher_cache_used: bool = False
    training_seconds: float = 0.0
    total_seconds: float = 0.0
    onnx_export: dict[str, Any] | None = Field(
        default=None,
        description="sequence-classification: {file, opset, max_abs_difference vs PyTorch} or {error}",
    )
    # ---- language models ----
    teacher_agreement: float | None = Field(
        default=None,
        description="causal-lm / masked-lm: fraction of test target tokens where the delivered student's top "
        "token is the teacher's (higher is better)",
    )
    teacher_signal_cache: dict[str, Any] | None = Field(
        default=None,
        description="The reusable top-k teacher cache: {status: hit|miss|not_stored|too_large, key, bytes, "
        "tokens, bytes_per_token, teacher_seconds, teacher_seconds_saved}",
    )
    sequence_kd: dict[str, Any] | None = Field(
        default=None,
        description="sequence_kd: {key, reused, teacher_seconds} of the teacher-generated targets",
    )
    target_retention: float | None = Field(
        default=None, description="The spec's retention target (the size was searched)"
    )
    target_met: bool | None = Field(
        default=None,
        description="With target_retention: whether the delivered student's accuracy_retention (test) "
        "reaches it; False when no size did within the budget (the best found is delivered)",
    )
    search: SearchSummary | None = None
    trials: list[TrialResult] = Field(
        default_factory=list, description="Every size the retention search trained, in order"
    )
    seed_summary: SeedSummary | None = Field(
        default=None, description="With training_config.seeds: mean and spread over the seeds"
    )
    compression_stages: list[CompressionStage] = Field(
        default_factory=list,
        description="Post-training compression, one entry per stage, the distilled student first",
    )
