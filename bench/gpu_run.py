"""The GPU run, prepared (`make bench-gpu`): every GPU figure in one command and one JSON file.

Runs, each as its own process (so one failing step is recorded and the others still run):
1. `bench/gpu.py`: KD throughput, our trainer vs a plain PyTorch loop, BERT-base-sized teacher (CUDA, bf16);
2. `bench/bench_trainer.py`: the trainer ratio on the digits job (CPU, as in bench/README.md);
3. `bench/bench_ddp.py --device cuda --world-size 2`: one GPU vs two on the same text job (nccl).
Writes `{"machine": ..., "steps": {name: {"command", "seconds", "returncode", "figures", "log_tail"}}}` to
`--out`. Exits non-zero when a step failed. `--smoke` runs every step's CPU smoke mode (the suite's check).

    .venv/bin/python bench/gpu_run.py --out bench/results/gpu.json      # on a machine with 2+ GPUs
    .venv/bin/python bench/gpu_run.py --smoke --out /tmp/gpu-smoke.json  # CPU: checks the scripts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def machine() -> dict[str, Any]:
    """What ran the figures: devices, versions, load."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_1_5_15": load,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def steps(smoke: bool, work: Path, data_dir: Path) -> dict[str, list[str]]:
    """Each step's command line; every one writes its figures to work/<name>.json."""
    python = sys.executable
    if smoke:
        return {
            "gpu_kd": [python, str(BENCH / "gpu.py"), "--smoke"],
            "trainer_ratio": [
                python,
                str(BENCH / "bench_trainer.py"),
                "--rounds",
                "1",
                "--epochs",
                "1",
                "--data-dir",
                str(data_dir),
            ],
            "ddp_two_ranks": [python, str(BENCH / "bench_ddp.py"), "--smoke", "--data-dir", str(data_dir)],
        }
    return {
        "gpu_kd": [python, str(BENCH / "gpu.py")],
        "trainer_ratio": [python, str(BENCH / "bench_trainer.py"), "--data-dir", str(data_dir)],
        "ddp_two_ranks": [
            python,
            str(BENCH / "bench_ddp.py"),
            "--device",
            "cuda",
            "--world-size",
            "2",
            "--rows",
            "20000",
            "--hidden",
            "256",
            "--seq",
            "64",
            "--batch-size",
            "256",
        ],
    }


def run_step(name: str, command: list[str], work: Path, timeout_s: float) -> dict[str, Any]:
    figures_file = work / f"{name}.json"
    command = [*command, "--json", str(figures_file)]
    env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, output = -1, f"timed out after {timeout_s:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    figures = json.loads(figures_file.read_text()) if figures_file.is_file() else None
    return {
        "command": " ".join(command),
        "seconds": round(time.monotonic() - started, 2),
        "returncode": returncode,
        "figures": figures,
        "log_tail": output[-3000:] if returncode else output[-600:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every step's CPU smoke mode (seconds)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", REPO / ".distillery"))
    )
    parser.add_argument("--step-timeout", type=float, default=1800.0, help="seconds per step")
    args = parser.parse_args()
    if not args.smoke:
        import torch

        if torch.cuda.device_count() < 2:
            parser.error(
                f"this machine has {torch.cuda.device_count()} CUDA device(s); the GPU run needs 2 "
                "(run with --smoke for the CPU check)"
            )
    report: dict[str, Any] = {"smoke": args.smoke, "machine": machine(), "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-run-") as tmp:
        for name, command in steps(args.smoke, Path(tmp), args.data_dir).items():
            print(f"[gpu_run] {name}: {' '.join(command)}", flush=True)
            result = run_step(name, command, Path(tmp), args.step_timeout)
            report["steps"][name] = result
            print(f"[gpu_run] {name}: rc {result['returncode']} in {result['seconds']:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"[gpu_run] figures in {args.out}")
    failed = [name for name, step in report["steps"].items() if step["returncode"] != 0]
    if failed:
        for name in failed:
            print(f"[gpu_run] {name} failed:\n{report['steps'][name]['log_tail']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
