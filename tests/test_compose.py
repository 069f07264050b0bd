"""The compose file and Dockerfile are checked here, since no Docker engine runs on this machine."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_CANDIDATES = (
    ROOT.parent / "shared" / "schemas" / "compose-spec.json",
    ROOT / "tests" / "data" / "compose-spec.json",
)


def _schema() -> dict[str, Any]:
    for path in SCHEMA_CANDIDATES:
        if path.exists():
            return json.loads(path.read_text())
    pytest.fail(f"compose-spec.json not found in {[str(p) for p in SCHEMA_CANDIDATES]}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_matches_the_official_schema() -> None:
    jsonschema.Draft7Validator(_schema()).validate(_compose())


def test_compose_runs_the_whole_stack_with_healthchecks_and_volumes() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "scheduler", "worker", "flower"} <= set(services)
    for name in ("postgres", "redis", "api", "worker"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # API, scheduler and workers share DATA_DIR (artifacts, checkpoints, built-in teachers).
    for name in ("api", "worker"):
        assert "distillery-data:/data" in services[name]["volumes"]
    assert services["scheduler"]["command"] == ["python", "-m", "app.scheduler"]


def test_each_gpu_worker_reserves_its_own_device() -> None:
    services = _compose()["services"]
    device_ids = []
    for name in ("worker", "worker-gpu1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        device_ids.append(device["device_ids"][0])
    assert len(set(device_ids)) == 2


def test_dockerfile_has_torch_free_api_and_worker_targets_running_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, flags=re.M | re.S))
    assert {"api", "worker", "api-build", "worker-build"} <= set(stages)
    assert "[api]" in stages["api-build"] and "torch" not in stages["api-build"]
    assert "[worker]" in stages["worker-build"] and "torch==" in stages["worker-build"]
    for target in ("api", "worker"):
        assert "USER distillery" in stages[target]
