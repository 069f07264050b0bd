"""The checkpoint format: safetensors tensors + a JSON structure (no pickle), written in the background.

`save_checkpoint(path, payload)` snapshots a nested payload (dicts, lists, tuples, tensors, primitives) on the
caller's thread and writes it atomically behind it; `load_checkpoint` restores it exactly; the RNG helpers
capture what an exact resume needs. `CHECKPOINT_FORMAT` versions the runner's payload.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_FILE = "last.safetensors"
CHECKPOINT_FORMAT = 3  # 3: finished runs are runner.StageRecord payloads (delivered state)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Global and data-order RNG states, as tensors (loadable with weights_only)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flushes_checkpoints(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """The wrapped call returns or raises only once every checkpoint it handed over is on disk."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        finally:
            flush_checkpoints()

    return wrapper


_MARKERS = frozenset({"__tensor__", "__tuple__", "__dict__"})
_PRIMITIVES = (bool, int, float, str, type(None))


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """A JSON-able mirror of `value` whose tensors are moved into `tensors` (by key).

    Dicts with string keys stay JSON objects; other dicts (e.g. an optimizer's int-keyed state) and tuples
    are wrapped in a marker object so they come back as they were.
    """
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, torch.Tensor):
        key = seen.get(id(value))
        if key is None:
            key = seen[id(value)] = f"t{len(tensors)}"
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(type(k) is str for k in value) and not _MARKERS.intersection(value):
            return {
                k: v if isinstance(v, _PRIMITIVES) else _encode(v, tensors, seen) for k, v in value.items()
            }
        return {
            "__dict__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in value.items()]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [v if isinstance(v, _PRIMITIVES) else _encode(v, tensors, seen) for v in value]
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none. Safetensors + JSON: nothing is unpickled."""
    flush_checkpoints()
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        structure = json.loads(handle.metadata()["structure"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    payload: dict[str, Any] = _decode(structure, tensors)
    return payload


# One background writer per process: checkpoints are snapshotted on the training thread (tensors copied,
# structure serialised) and written in order behind it, so per-epoch checkpoints cost the loop only the copy.
_CHECKPOINT_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
_pending_writes: list[Future[None]] = []
_pending_lock = threading.Lock()


def _write_checkpoint_file(path: Path, tensors: dict[str, torch.Tensor], structure: str) -> None:
    """Write atomically (temp file + rename): a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"structure": structure})
    os.replace(tmp, path)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Snapshot `payload` now and write it in the background; `flush_checkpoints()` waits for the writes."""
    with _pending_lock:
        done = [future for future in _pending_writes if future.done()]
        for future in done:
            _pending_writes.remove(future)
    for future in done:
        future.result()  # a failed earlier write surfaces here rather than at the end of the run
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(payload, tensors, {}))
    future = _CHECKPOINT_WRITER.submit(_write_checkpoint_file, path, tensors, structure)
    with _pending_lock:
        _pending_writes.append(future)


def _write_weights_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _submit(fn: Callable[..., None], *args: Any) -> None:
    with _pending_lock:
        done = [future for future in _pending_writes if future.done()]
        for future in done:
            _pending_writes.remove(future)
    for future in done:
        future.result()
    future = _CHECKPOINT_WRITER.submit(fn, *args)
    with _pending_lock:
        _pending_writes.append(future)


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Snapshot a plain state dict now and write it as a safetensors file in the background (after the
    checkpoints handed over before it); returns the tensor bytes."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    _submit(_write_weights_file, path, tensors, dict(metadata))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def remove_file(path: Path) -> None:
    """Delete `path` in the writer's order (after every write handed over before)."""
    _submit(functools.partial(path.unlink, missing_ok=True))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors weights file and its metadata."""
    flush_checkpoints()
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    return tensors, metadata


def flush_checkpoints() -> None:
    """Wait until every checkpoint handed to `save_checkpoint` is on disk (re-raises a failed write)."""
    with _pending_lock:
        futures = list(_pending_writes)
        _pending_writes.clear()
    for future in futures:
        future.result()
