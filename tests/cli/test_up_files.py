"""`distillery up --files DIR`: refused when it overlaps DATA_DIR, before anything starts."""

from __future__ import annotations

from pathlib import Path

from tests.cli.cli_helpers import distillery


def test_up_refuses_a_files_folder_inside_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = distillery(
        "up",
        "--files",
        str(data_dir / "mine"),
        "--port",
        "1",
        cwd=tmp_path,
        home=tmp_path,
        DATA_DIR=str(data_dir),
    )
    assert result.code == 2, result.out
    assert "overlaps DATA_DIR" in result.out
    assert "Traceback" not in result.out
    assert not (data_dir / "distillery.db").exists()  # nothing migrated, nothing started
