"""Bad job files: one line with line and column for broken JSON, the nearest field for a misspelled one, and
each server-side error (an unknown teacher) printed once."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.schemas.job_spec import JobSpec
from distillery_cli.jobfile import JobFileError, describe_errors, fields_at, load_job_file, suggest_field
from tests.cli.cli_helpers import distillery
from tests.live_server import live_server
from tests.sse_helpers import DIGITS_JOB


def test_invalid_json_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(
        '{\n  "teacher_model_name": "digits-cnn",\n  "training_config": {"epochs": 3 "x": 1}\n}\n'
    )
    with pytest.raises(JobFileError) as caught:
        load_job_file(path)
    assert str(caught.value) == f"{path}:3:35: invalid JSON: Expecting ',' delimiter"
    result = distillery("run", str(path), cwd=tmp_path, home=tmp_path)
    assert result.code == 2
    assert result.out.strip() == f"{path}:3:35: invalid JSON: Expecting ',' delimiter"  # no traceback


def test_a_job_file_must_hold_an_object(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text("[1, 2]")
    with pytest.raises(JobFileError, match="one JSON object, not list"):
        load_job_file(path)


def test_misspelled_fields_get_the_nearest_name_at_their_level() -> None:
    assert suggest_field(JobSpec, ["training_config", "epochz"]) == "epochs"
    assert suggest_field(JobSpec, ["target_compresion"]) == "target_compression"
    # A union member's tag in the location narrows the union to that member.
    assert suggest_field(JobSpec, ["dataset_config", "builtin", "nmae"]) == "name"
    assert "batch_size" in fields_at(JobSpec, ["training_config"])
    lines = describe_errors(
        [
            {
                "loc": ["body", "training_config", "zzzzzz"],
                "msg": "Extra inputs are not permitted",
                "type": "extra_forbidden",
            }
        ],
        JobSpec,
    )
    assert lines[0].startswith("training_config.zzzzzz: unknown field; valid here: ")
    assert "epochs" in lines[0]


def test_run_lists_every_misspelled_field_with_a_suggestion(tmp_path: Path) -> None:
    spec = DIGITS_JOB | {"target_compresion": 0.25, "training_config": {"epochz": 3}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    result = distillery("run", str(path), cwd=tmp_path, home=tmp_path)
    assert result.code == 2
    assert "training_config.epochz: unknown field; did you mean 'epochs'?" in result.out
    assert "target_compresion: unknown field; did you mean 'target_compression'?" in result.out
    assert "Extra inputs are not permitted" not in result.out and "Traceback" not in result.out


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server() as url:
        yield url


def test_submit_explains_the_servers_422_once_with_suggestions(
    server: str, clean_database: str, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    key = auth_headers["Authorization"].removeprefix("Bearer ")
    env = {"DISTILLERY_URL": server, "DISTILLERY_API_KEY": key}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(DIGITS_JOB | {"training_config": {"epochz": 3}}))
    misspelled = distillery("submit", str(path), cwd=tmp_path, home=tmp_path, **env)
    assert misspelled.code == 1
    assert "training_config.epochz: unknown field; did you mean 'epochs'?" in misspelled.out

    path.write_text(json.dumps(DIGITS_JOB | {"teacher_model_name": "no-such-teacher"}))
    unknown = distillery("submit", str(path), cwd=tmp_path, home=tmp_path, **env)
    assert unknown.code == 1
    assert unknown.out.count("Unknown teacher 'no-such-teacher'") == 1, unknown.out
    assert re.search(
        r"teacher_model_name: Unknown teacher 'no-such-teacher'; valid teachers: .*digits-cnn", unknown.out
    )


def test_run_takes_world_size_and_checks_it_against_the_global_batch(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(DIGITS_JOB | {"training_config": {"batch_size": 64}}))
    result = distillery("run", str(path), "--world-size", "3", cwd=tmp_path, home=tmp_path)
    assert result.code == 2
    assert "divisible by training_config.world_size (3)" in result.out
