"""Running the `distillery` CLI as a user does: a process in a folder of the test's choosing."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.live_server import ROOT


@dataclass
class Result:
    code: int
    out: str


def distillery(*args: str, cwd: Path, home: Path, **env: str) -> Result:
    """Run the CLI in `cwd`, config dir under `home`, without the test's DISTILLERY_* and DATA_DIR."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_") and k not in {"DATA_DIR"}}
    base |= {"XDG_CONFIG_HOME": str(home / "config"), "HOME": str(home), "PYTHONPATH": str(ROOT)}
    base |= {"COLUMNS": "80", "NO_COLOR": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "distillery_cli.main", *args],
        cwd=cwd,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Result(completed.returncode, completed.stdout + completed.stderr)
