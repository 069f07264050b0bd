"""The CLI finds the server and its key from any folder: flags > env > config file > ./.distillery.

Run as a user would: a `distillery` process started in a temporary directory against a real API server on a
free port (never :8000), with its own config directory.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import get_settings
from tests.cli.cli_helpers import distillery
from tests.live_server import live_server
from tests.sse_helpers import complete, create_job, start_and_claim, tenant_of


@pytest.fixture(scope="module")
def server(migrated_database: str) -> Iterator[str]:
    with live_server() as url:
        yield url


@pytest.fixture()
def key(clean_database: str, auth_headers: dict[str, str]) -> str:
    return auth_headers["Authorization"].removeprefix("Bearer ")


def test_login_saves_url_and_key_and_any_folder_then_uses_them(server: str, key: str, tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    assert not server.endswith(":8000")

    before = distillery("jobs", cwd=elsewhere, home=home)
    assert before.code == 1  # nothing configured: the default :8000 is not this server
    login = distillery("login", "--url", server, "--key", key, cwd=tmp_path, home=home)
    assert login.code == 0, login.out
    config_file = home / "config" / "distillery" / "config.toml"
    assert f"to {config_file}" in login.out and key not in login.out  # only the prefix is echoed
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert server in config_file.read_text()

    job_id = create_job(get_settings(), tenant_of({"Authorization": f"Bearer {key}"}))
    listed = distillery("jobs", cwd=elsewhere, home=home)
    assert listed.code == 0, listed.out
    assert f"\n{job_id}  pending" in listed.out  # whole, at 80 columns
    shown = distillery("config", cwd=elsewhere, home=home)
    assert f"{server}  (from config file {config_file})" in shown.out
    assert f"{key[:11]}…  (from config file {config_file})" in shown.out


def test_a_bad_key_says_which_key_was_sent_and_where_it_came_from(
    server: str, key: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    assert distillery("login", "--url", server, "--key", key, cwd=tmp_path, home=home).code == 0

    from_env = distillery("jobs", cwd=tmp_path, home=home, DISTILLERY_API_KEY="dk_wrongwrongwrong")
    assert from_env.code == 1
    assert "401" in from_env.out
    assert "sent key dk_wrongwro… (from DISTILLERY_API_KEY)" in from_env.out
    assert "wrongwrongwrong" not in from_env.out  # the whole key is never printed

    # A flag beats the environment, which beats the config file.
    from_flag = distillery(
        "jobs", "--api-key", "dk_flagflagflag", cwd=tmp_path, home=home, DISTILLERY_API_KEY="dk_wrong"
    )
    assert "sent key dk_flagflag… (from --api-key)" in from_flag.out
    assert distillery("jobs", "--api-key", key, cwd=tmp_path, home=home, DISTILLERY_API_KEY="dk_x").code == 0


def test_the_local_stack_files_are_the_last_resort(server: str, key: str, tmp_path: Path) -> None:
    home, project = tmp_path / "home", tmp_path / "project"
    (project / ".distillery").mkdir(parents=True)
    (project / ".distillery" / "url").write_text(server + "\n")
    (project / ".distillery" / "api_key").write_text(key + "\n")
    assert distillery("jobs", cwd=project, home=home).code == 0
    shown = distillery("config", cwd=project, home=home)
    assert f"(from {project / '.distillery' / 'url'})" in shown.out
    # The environment beats those files.
    other = distillery("config", cwd=project, home=home, DISTILLERY_URL="http://127.0.0.1:1")
    assert "http://127.0.0.1:1  (from DISTILLERY_URL)" in other.out


def test_download_of_a_job_without_artifacts_says_so_and_creates_nothing(
    server: str, key: str, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    job_id = create_job(get_settings(), tenant_of(auth_headers))
    out = tmp_path / "out"
    empty = distillery(
        "download",
        job_id,
        "--out",
        str(out),
        cwd=tmp_path,
        home=home,
        DISTILLERY_URL=server,
        DISTILLERY_API_KEY=key,
    )
    assert empty.code == 1
    assert f"job {job_id} has no artifacts (status pending)" in empty.out
    assert not out.exists()

    claim = start_and_claim(get_settings(), job_id)
    complete(claim, 2, artifact_files={"student.safetensors": b"weights", "results.json": b"{}"})
    done = distillery(
        "download",
        job_id,
        "--out",
        str(out),
        cwd=tmp_path,
        home=home,
        DISTILLERY_URL=server,
        DISTILLERY_API_KEY=key,
    )
    assert done.code == 0, done.out
    assert (out / "student.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "student.safetensors"]
