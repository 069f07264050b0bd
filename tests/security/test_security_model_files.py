"""Model files that carry code: a pickle whose payload would leave a trace (create a file) if it ever ran.

Refused as `unsafe_model_file` at registration (opcodes read, torch-free), by `distillery run` (one clean
line, no traceback) and by a worker (stored error code); safetensors beside it are preferred and load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.model_files import unsafe_model_files
from app.models import Job, utcnow
from app.services.scheduler import admit_queued_jobs
from tests.engine.tiny_models import classification_rows, save_tiny_bert, write_jsonl
from tests.live_server import ROOT
from tests.security.conftest import Server, TenantFactory


class _Payload:
    """Unpickling this runs `touch <marker>`: the trace we check is never left."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _hostile_teacher(directory: Path, marker: Path, *, keep_safetensors: bool = False) -> None:
    """A real tiny BERT directory whose weights are a torch pickle carrying the payload."""
    model = save_tiny_bert(directory, layers=1, hidden=16, heads=2)
    if not keep_safetensors:
        (directory / "model.safetensors").unlink()
    state: dict[str, Any] = dict(model.state_dict())
    state["payload"] = _Payload(marker)
    torch.save(state, directory / "pytorch_model.bin")


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    path = tmp_path / f"payload-ran-{uuid.uuid4().hex}"
    yield path
    assert not path.exists(), "the pickle payload was executed"


def _job_spec(data: str) -> dict[str, Any]:
    return {
        "teacher_model_name": "x",
        "task": "sequence-classification",
        "target_compression": 0.5,
        "training_config": {"epochs": 1, "batch_size": 8, "device": "cpu"},
        "dataset_config": {"kind": "file", "path": data},
    }


def test_distillery_run_refuses_it_in_one_clean_line(tmp_path: Path, marker: Path) -> None:
    _hostile_teacher(tmp_path / "teacher", marker)
    write_jsonl(tmp_path / "data.jsonl", classification_rows(40))
    (tmp_path / "job.json").write_text(json.dumps(_job_spec("data.jsonl")))
    result = subprocess.run(
        [sys.executable, "-m", "distillery_cli.main", "run", "job.json", "--teacher", "teacher"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "UnpicklingError" not in output
    [line] = [line for line in output.splitlines() if "job failed" in line]
    assert line.startswith("job failed (unsafe_model_file): teacher 'teacher': pytorch_model.bin is a pickle")
    assert "posix.system" in line and "safetensors" in line


def test_registration_refuses_it_and_a_worker_stores_the_code(
    shared_root_server: Server, two_tenants: TenantFactory, marker: Path
) -> None:
    from workers.tasks import execute_job

    root = shared_root_server.file_root
    assert root is not None
    alice, _ = two_tenants(shared_root_server)
    folder = root / uuid.uuid4().hex
    _hostile_teacher(folder / "hostile", marker)
    name = f"t-{uuid.uuid4().hex[:8]}"
    teacher = {"name": name, "kind": "local", "location": f"{folder.name}/hostile", "type": "transformer"}
    refused = alice.client.post("/distillation/teachers", json=teacher)
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["type"] == "unsafe_model_file"
    assert "posix.system" in refused.json()["detail"] and "safetensors" in refused.json()["detail"]

    # A clean directory registers; the tenant then swaps the pickle in: the worker refuses it too.
    save_tiny_bert(folder / "clean", layers=1, hidden=16, heads=2)
    teacher["location"] = f"{folder.name}/clean"
    assert alice.client.post("/distillation/teachers", json=teacher).status_code == 201
    shutil.rmtree(folder / "clean")
    shutil.copytree(folder / "hostile", folder / "clean")
    write_jsonl(folder / "data.jsonl", classification_rows(40))
    spec = _job_spec(f"{folder.name}/data.jsonl") | {"teacher_model_name": name}
    created = alice.client.post("/distillation/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.queued_at = "queued", utcnow()
    with session_scope() as session:
        wide = get_settings().model_copy(update={"max_concurrent_jobs": 100})
        assert job_id in admit_queued_jobs(session, wide)
    assert execute_job(job_id, worker="security-test").startswith("failed (unsafe_model_file)")
    error = alice.client.get(f"/distillation/jobs/{job_id}").json()["error"]
    assert error["code"] == "unsafe_model_file" and "pytorch_model.bin" in error["message"]
    assert str(root) not in error["message"]


def test_safetensors_are_preferred_when_a_directory_has_both(tmp_path: Path, marker: Path) -> None:
    from app.schemas.job_spec import Task
    from app.schemas.teachers import TeacherSource, TeacherSourceKind
    from workers.distill.tasks.transformers.models import load_hf_teacher

    _hostile_teacher(tmp_path / "both", marker, keep_safetensors=True)
    assert unsafe_model_files(tmp_path / "both") == {}  # the pickle is never read
    source = TeacherSource(name="both", kind=TeacherSourceKind.local, location="both", type="transformer")
    loaded = load_hf_teacher(source, Task.sequence_classification, num_labels=3, file_root=tmp_path)
    assert loaded.model.num_parameters() > 0
