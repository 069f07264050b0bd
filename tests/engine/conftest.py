"""Engine test fixtures: the shared data dir (built-in teacher built once per run) and modest threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    """Other helpers' tests share two cores: keep torch to one intra-op thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The run's DATA_DIR (set by tests/conftest.py): the digits-cnn teacher built there is shared."""
    path = Path(os.environ["DATA_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


class RecordingCallbacks:
    """Callbacks that record everything and can ask the engine to stop at a condition."""

    def __init__(self, stop_when: Any = None, write_when: Any = None) -> None:
        self.progress: list[Any] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.stop_when = stop_when
        self.write_when = write_when  # may_write's answer (default: always True)
        self.stop_checks = 0
        self.write_checks = 0

    def on_progress(self, progress: Any) -> None:
        self.progress.append(progress)

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((kind, message, data))

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return bool(self.stop_when and self.stop_when(self))

    def may_write(self) -> bool:
        self.write_checks += 1
        return True if self.write_when is None else bool(self.write_when(self))

    def metrics(self) -> list[dict[str, Any]]:
        return [data for kind, _, data in self.events if kind == "metric"]


@pytest.fixture
def recording() -> type[RecordingCallbacks]:
    return RecordingCallbacks
