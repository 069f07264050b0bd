"""One Settings object, read once from the environment, shared by API, scheduler, workers and migrations."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.paths import overlaps, tenant_file_root


class Settings(BaseSettings):
    """Service configuration. Every field maps to an upper-case environment variable."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    data_dir: Path = Field(
        default=Path("./.distillery"),
        description="Artifacts, checkpoints, built-in teachers, uploads and the embedded database.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Empty: a SQLite file under DATA_DIR (the embedded default).",
    )
    broker_url: str = Field(
        default="",
        description="Celery broker URL. Empty: Kombu's filesystem transport under DATA_DIR (no server).",
    )
    broker_key_prefix: str = Field(
        default="",
        description="Prefix for every Redis key the broker writes (lets test runs share a server).",
    )
    host: str = "127.0.0.1"
    port: int = 8000

    max_concurrent_jobs: int = Field(default=2, ge=1, description="Jobs dispatched or running at once.")
    max_queued_jobs: int = Field(default=100, ge=1, description="Queued jobs before start answers 429.")
    tick_seconds: float = Field(default=2.0, gt=0, description="Scheduler loop period.")
    dispatch_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a dispatched job may wait for a worker's claim before re-send.",
    )
    heartbeat_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds without a heartbeat before a running job is re-queued.",
    )
    heartbeat_interval: float = Field(default=5.0, gt=0, description="Worker heartbeat period.")
    max_attempts: int = Field(default=3, ge=1, description="Attempts before a job fails for good.")
    worker_concurrency: int = Field(default=1, ge=1, description="Jobs per worker process (one per GPU).")

    max_epochs: int = Field(default=200, ge=1, description="Upper bound on training_config.epochs.")
    max_batch_size: int = Field(default=4096, ge=1, description="Upper bound on training_config.batch_size.")
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1, description="Dataset upload limit.")
    max_upload_columns: int = Field(
        default=1000, ge=2, le=1_000_000, description="Columns (CSV header or JSONL keys) an upload may have."
    )
    max_upload_line_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Longest line an uploaded CSV or JSONL file may have."
    )
    allowed_file_root: Path | None = Field(
        default=None,
        description="Folder under which `file` datasets and local teacher directories must lie. Unset: "
        "tenants cannot name server paths at all (uploads still work). Never DATA_DIR, inside it or "
        "above it.",
    )
    allowed_file_root_per_tenant: bool = Field(
        default=False,
        description="Each tenant gets ALLOWED_FILE_ROOT/<tenant name>/ instead of the whole root.",
    )
    dashboard_session_hours: float = Field(
        default=8.0, gt=0, le=24 * 30, description="Hours a dashboard sign-in lasts (sign-out ends it)."
    )
    trust_remote_code: bool = Field(default=False, description="Allow hub models with custom code.")
    admin_api_key: str = Field(
        default="",
        description="Bearer key for /admin/keys (creates and revokes tenant keys). Empty: admin endpoints "
        "answer 403.",
    )
    tenant_max_running_jobs: int | None = Field(
        default=None,
        ge=1,
        description="Jobs of one tenant dispatched or running at once (admission). Unset: "
        "MAX_CONCURRENT_JOBS.",
    )
    tenant_max_queued_jobs: int | None = Field(
        default=None,
        ge=1,
        description="Queued jobs of one tenant before start answers 429. Unset: MAX_QUEUED_JOBS.",
    )
    idempotency_ttl_hours: float = Field(
        default=24.0, ge=24.0, description="Hours an Idempotency-Key's first response is kept for replay."
    )
    progress_min_interval: float = Field(
        default=1.0, ge=0, description="Minimum seconds between progress writes to the database."
    )
    sse_poll_seconds: float = Field(
        default=0.5, gt=0, description="How often an event stream looks for new job events in the database."
    )
    sse_keepalive_seconds: float = Field(
        default=15.0, gt=0, description="Seconds of silence after which an event stream sends a comment."
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="Seconds an API process reuses an accepted key's lookup (0: off). A key revoked "
        "through another API process is still accepted here for at most this long.",
    )
    webhook_allow_private_networks: bool = Field(
        default=False,
        description="Allow webhook URLs that resolve to private, loopback or link-local addresses (off: "
        "refused with 422 at registration and not sent, against server-side request forgery).",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, description="Seconds a webhook endpoint has to answer one delivery."
    )
    webhook_retry_base_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Wait before the first webhook retry; each further retry waits twice as long "
        "(capped by WEBHOOK_RETRY_MAX_DELAY_SECONDS).",
    )
    webhook_retry_max_delay_seconds: float = Field(
        default=3600.0, gt=0, description="Longest wait between two webhook attempts."
    )
    webhook_retry_hours: float = Field(
        default=26.0, ge=24.0, description="Hours a webhook delivery is retried before it is marked failed."
    )
    webhook_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often the scheduler process looks for webhook deliveries due."
    )
    estimate_default_flops_per_second: float = Field(
        default=2e9,
        gt=0,
        description="Training FLOP/s assumed by POST /distillation/jobs/estimate before any finished job "
        "of the same task and device type measured it.",
    )
    checkpoint_keep: int = Field(
        default=3,
        ge=2,
        le=100,
        description="Checkpoints kept per job: always `last` and `best`, plus the most recent epoch "
        "checkpoints up to this many in all.",
    )
    teacher_cache_max_bytes: int = Field(
        default=2 * 2**30,
        ge=0,
        validation_alias=AliasChoices("teacher_cache_max_bytes", "distillery_teacher_cache_max_bytes"),
        description="Engine: teacher_cache=auto caches teacher outputs up to this many bytes.",
    )
    checkpoint_min_interval_s: float = Field(
        default=0.0,
        ge=0,
        validation_alias=AliasChoices("checkpoint_min_interval_s", "distillery_checkpoint_min_interval_s"),
        description="Engine: minimum seconds between epoch checkpoints (0: every epoch).",
    )
    teacher_signal_cache_max_bytes: int = Field(
        default=20 * 2**30,
        ge=0,
        description="Engine: bytes of reusable teacher-signal caches (top-k LM logits) under "
        "DATA_DIR/teacher_caches, over every tenant; least-recently-used caches are evicted (0: off).",
    )
    distributed_timeout_s: float = Field(
        default=45.0,
        gt=0,
        description="Engine: a multi-process job's collective timeout in seconds (keep it below "
        "HEARTBEAT_TIMEOUT): a hung or dead rank fails the job with distributed_failure.",
    )
    worker_devices: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Devices this worker offers one job (its largest training_config.world_size): default "
        "the CUDA device count, or 1 on a CPU worker.",
    )
    log_format: str = Field(default="json", pattern="^(json|text)$", description="Log lines: json or text.")
    log_level: str = Field(default="INFO", description="Root log level (DEBUG, INFO, WARNING, ...).")
    access_log_batch_seconds: float = Field(
        default=0.05,
        ge=0,
        le=10,
        description="API: the access lines of the requests that end within this many seconds are written "
        "together, that long after the first (about a third of their cost per request); all are written at "
        "a graceful shutdown. 0: each line as its request ends.",
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("allowed_file_root", mode="before")
    @classmethod
    def _absolute_file_root(cls, value: object) -> Path | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # ALLOWED_FILE_ROOT= (empty) means unset, not the working directory
        return Path(str(value)).expanduser().resolve()

    @model_validator(mode="after")
    def _file_root_outside_data_dir(self) -> Settings:
        """The service's storage (every tenant's uploads, artifacts, the key file) is never a file root."""
        if self.allowed_file_root is not None and overlaps(self.allowed_file_root, self.data_dir):
            raise ValueError(
                f"ALLOWED_FILE_ROOT ({self.allowed_file_root}) overlaps DATA_DIR ({self.data_dir}): DATA_DIR "
                "holds every tenant's uploads, artifacts and keys, so it can be neither the file root, "
                "inside it, nor contain it. Point ALLOWED_FILE_ROOT at a folder of its own (e.g. "
                "/srv/distillery-files), or leave it unset to refuse server paths."
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'distillery.db'}"

    @property
    def is_embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://localhost//"

    @property
    def broker_transport_options(self) -> dict[str, Any]:
        """Transport options for the configured broker (folders for filesystem, key prefix for Redis)."""
        if self.is_embedded_broker:
            folder = self.data_dir / "broker"
            return {
                "data_folder_in": str(folder / "queue"),
                "data_folder_out": str(folder / "queue"),
                "processed_folder": str(folder / "processed"),
                "control_folder": str(folder / "control"),
                "store_processed": False,
                "polling_interval": 0.2,
            }
        options: dict[str, Any] = {
            # Longer than the longest job: acks_late messages must not be redelivered mid-training.
            "visibility_timeout": 7 * 24 * 3600,
        }
        if self.broker_key_prefix:
            options["global_keyprefix"] = self.broker_key_prefix
        return options

    @property
    def effective_tenant_max_running_jobs(self) -> int:
        return self.tenant_max_running_jobs or self.max_concurrent_jobs

    @property
    def effective_tenant_max_queued_jobs(self) -> int:
        return self.tenant_max_queued_jobs or self.max_queued_jobs

    @property
    def file_root(self) -> Path | None:
        """ALLOWED_FILE_ROOT, resolved; None when server paths are refused."""
        return self.allowed_file_root

    def file_root_for(self, tenant_name: str | None) -> Path | None:
        """The folder a tenant's `file` datasets and local teachers resolve under (None: refused)."""
        return tenant_file_root(
            self.allowed_file_root, per_tenant=self.allowed_file_root_per_tenant, tenant_name=tenant_name
        )

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def teachers_dir(self) -> Path:
        return self.data_dir / "teachers"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.jobs_dir, self.uploads_dir, self.teachers_dir):
            path.mkdir(parents=True, exist_ok=True)
        if self.is_embedded_broker:
            for key in ("data_folder_in", "processed_folder", "control_folder"):
                Path(self.broker_transport_options[key]).mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
