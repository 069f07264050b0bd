"""`distillery run`: a whole local job with the live display `distillery watch` draws, and Ctrl-C, which stops
at the next check and keeps the checkpoint, so the same command resumes where it stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.cli.cli_helpers import distillery
from tests.live_server import ROOT

TINY = ROOT / "examples" / "tiny.json"


def test_run_trains_locally_with_the_watch_display_and_prints_the_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = distillery("run", str(TINY), "--out", str(out), cwd=tmp_path, home=tmp_path)
    assert result.code == 0, result.out
    # The lines and the bar of `distillery watch`: phases, one line per training stage, 100% at the end.
    assert "  distill stage 1: ratio 0.05" in result.out
    assert re.search(
        r"  distill stage 1: 2 epochs, last loss [\d.]+  kd [\d.]+  ce [\d.]+  val [\d.]+", result.out
    )
    assert "100% completed" in result.out
    assert "Retention" in result.out and f"artifacts: {out / 'artifacts'}" in result.out
    results = json.loads((out / "artifacts" / "results.json").read_text())
    assert len(results["training_history"]) == 2


def test_ctrl_c_stops_at_the_next_check_and_the_same_command_resumes(tmp_path: Path) -> None:
    spec = json.loads(TINY.read_text())
    spec["training_config"]["epochs"] = 300  # digits epochs take well under 0.1 s: time to interrupt
    job = tmp_path / "long.json"
    job.write_text(json.dumps(spec))
    out, data = tmp_path / "out", tmp_path / "data"
    args = ["run", str(job), "--out", str(out), "--data-dir", str(data)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_") and k != "DATA_DIR"}
    env |= {"PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "COLUMNS": "80", "NO_COLOR": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "distillery_cli.main", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Interrupted once an epoch's kept weights are on disk: training is under way, the checkpoint written.
    deadline = time.monotonic() + 120
    while (
        not list(out.glob("checkpoints/epoch-*")) and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert re.search(r"stopped: stopped (in|after) distill stage 1 epoch \d+", output), output
    assert "run again to resume" in output
    assert not (out / "artifacts" / "results.json").exists()

    resumed = distillery(*args, cwd=tmp_path, home=tmp_path)
    assert resumed.code == 0, resumed.out
    epochs = re.search(r"distill stage 1: (\d+) epochs, last", resumed.out)
    assert epochs is not None, resumed.out
    assert 0 < int(epochs.group(1)) < 300  # only the epochs after the checkpoint were trained
    assert len(json.loads((out / "artifacts" / "results.json").read_text())["training_history"]) == 300
