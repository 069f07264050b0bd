"""Measured figures: latency of a forward pass on the job's device."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from workers.distill.adapter import TaskAdapter
from workers.distill.kernel import Batch, to_device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency_ms(
    adapter: TaskAdapter,
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    *,
    warmup: int = 3,
    min_runs: int = 7,
    max_runs: int = 50,
    budget_s: float = 1.0,
) -> float:
    """Median milliseconds of one fp32 forward pass (after warm-up), on `device`, in inference mode."""
    model.eval()
    on_device = to_device(batch, device)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            adapter.forward(model, on_device)
        _synchronize(device)
        started = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - started < budget_s):
            begin = time.perf_counter()
            adapter.forward(model, on_device)
            _synchronize(device)
            times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1000.0
