"""`make bench-gpu`'s CPU smoke mode: every step of the GPU run starts, finishes and leaves its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_run_smoke_writes_one_json_of_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    data_dir = Path(os.environ["DATA_DIR"])  # the suite's DATA_DIR: the digits teacher is built once there
    command = [sys.executable, str(REPO / "bench" / "gpu_run.py"), "--smoke", "--out", str(out)]
    done = subprocess.run(
        [*command, "--data-dir", str(data_dir), "--step-timeout", "300"],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["machine"]["torch"]
    steps = report["steps"]
    assert set(steps) == {"gpu_kd", "trainer_ratio", "ddp_two_ranks"}
    assert all(step["returncode"] == 0 and step["figures"] for step in steps.values())
    assert steps["gpu_kd"]["figures"]["ratio_ours_over_plain"] > 0
    assert steps["trainer_ratio"]["figures"]["teacher_cache_on"]["ratio_ours_over_plain"] > 0
    ddp = steps["ddp_two_ranks"]["figures"]
    assert ddp["world_sizes"] == [1, 2] and ddp["median"]["2"]["training_s"] > 0
