"""The reusable teacher-signal cache: a language-model teacher's top-k logits over a tokenised train split,
kept on disk under DATA_DIR and reused by every later job with the same key.

The key is a sha256 of the teacher's weights, the tokenised train split (which covers the tokenizer and
max_seq_length's truncation), max_seq_length, k, and (with a tail bucket) the temperature its normaliser was
computed at. Each example is stored at its real length (no padding): values as float16, ids as int32, the
tail normaliser float32, so a token costs 6k (+4) bytes. The metadata file (`meta.json`, read by the
torch-free API) and LRU eviction under `EngineConfig.signal_cache_max_bytes` live in
`app.services.teacher_caches`.
A miss runs the teacher, stores the signal and trains from the stored form, so a hit trains identically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from app.services import teacher_caches as store
from workers.distill.fingerprint import model_fingerprint, tensors_fingerprint
from workers.distill.kernel import TaskData, TensorDictDataset
from workers.distill.teacher_cache import TeacherCacheStore

logger = logging.getLogger(__name__)

FORMAT = 1
_STORED_DTYPES = {"logits": torch.float16, "extra.attention_mask": torch.int8}


@dataclass(frozen=True)
class SignalKey:
    """What a cache is keyed by, and the key."""

    key: str
    teacher_fingerprint: str
    data_fingerprint: str
    max_seq_length: int
    top_k: int
    tail: bool
    temperature: float | None


def signal_key(
    teacher: nn.Module, data: TaskData, *, max_seq_length: int, top_k: int, tail: bool, temperature: float
) -> SignalKey:
    """The cache key of (teacher weights, tokenised train split, max_seq_length, k[, tail at temperature])."""
    assert isinstance(data.train, TensorDictDataset)
    teacher_fp = model_fingerprint(teacher)
    data_fp = tensors_fingerprint(data.train.tensors)
    scale = temperature if tail else None
    parts = [f"v{FORMAT}", teacher_fp, data_fp, str(max_seq_length), str(top_k), f"tail={tail}/{scale}"]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    return SignalKey(key, teacher_fp, data_fp, max_seq_length, top_k, tail, scale)


def load(
    data_dir: Path, owner: str, key: SignalKey, *, device: torch.device
) -> tuple[TeacherCacheStore, dict[str, Any]] | None:
    """The stored signal on `device` (marked used) and its metadata; None on a miss or an unreadable cache."""
    entry = store.get(data_dir, owner=owner, key=key.key)
    if entry is None:
        return None
    try:
        cache = _from_file(entry.path / store.SIGNAL_FILE, entry.meta, device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        logger.warning("teacher cache %s unreadable (%s): rebuilding it", key.key, exc)
        return None
    store.touch(entry)
    return cache, entry.meta


def save(
    data_dir: Path,
    owner: str,
    key: SignalKey,
    cache: TeacherCacheStore,
    data: TaskData,
    *,
    teacher_name: str,
    task: str,
    teacher_seconds: float,
    max_bytes: int,
    device: torch.device,
) -> tuple[TeacherCacheStore, dict[str, Any]] | None:
    """Store `cache` (from the teacher pass) under the key; evict LRU caches to stay under max_bytes.

    Returns the stored form re-read (what training then uses) and its metadata; None when it alone is
    larger than max_bytes (then nothing is stored and the in-memory cache is used as is).
    """
    assert isinstance(data.train, TensorDictDataset)
    lengths = data.train.tensors["attention_mask"].sum(dim=1).clamp_min(1)  # (N,) real tokens (right-padded)
    tensors = _packed(cache, lengths)
    folder = store.owner_dir(data_dir, owner) / key.key
    partial = folder.with_name(f".{key.key}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / store.SIGNAL_FILE))
    size = (partial / store.SIGNAL_FILE).stat().st_size
    if size > max_bytes:
        shutil.rmtree(partial, ignore_errors=True)
        logger.info("teacher cache %s: %d bytes > bound %d, not stored", key.key, size, max_bytes)
        return None
    tokens = int(lengths.sum())
    now = time.time()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "key": key.key,
        "owner": owner,
        "teacher_name": teacher_name,
        "task": task,
        "teacher_fingerprint": key.teacher_fingerprint,
        "data_fingerprint": key.data_fingerprint,
        "max_seq_length": key.max_seq_length,
        "top_k": key.top_k,
        "tail": key.tail,
        "temperature": key.temperature,
        "layout": cache.layout,
        "examples": int(lengths.numel()),
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": size / max(tokens, 1),
        "teacher_seconds": teacher_seconds,
        "hits": 0,
        "created_at": now,
        "last_used_at": now,
    }
    store.write_meta(partial, meta)
    with store.locked(data_dir):
        shutil.rmtree(folder, ignore_errors=True)  # a concurrent job's identical copy: same content
        os.replace(partial, folder)
        evicted = store.evict_to_fit(data_dir, max_bytes=max_bytes, keep={folder})
    if evicted:
        logger.info("teacher caches evicted (least recently used): %s", ", ".join(evicted))
    return _from_file(folder / store.SIGNAL_FILE, meta, device), meta


def _packed(cache: TeacherCacheStore, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each entry's rows cut to their real length and concatenated: (total_tokens, ...) + lengths (N,)."""
    tensors: dict[str, torch.Tensor] = {"lengths": lengths.to(torch.int64)}
    for name, entry in cache.entries.items():
        rows = list(entry) if isinstance(entry, torch.Tensor) else entry
        if len(rows) != lengths.numel() or rows[0].dim() < 1:
            raise ValueError(f"cached entry {name} is not one row per example with a sequence dim")
        cut = [row[: int(n)] for row, n in zip(rows, lengths, strict=True)]
        packed = torch.cat(cut).cpu()
        tensors[name] = packed.to(_STORED_DTYPES.get(name, packed.dtype)).contiguous()
    return tensors


def _from_file(path: Path, meta: dict[str, Any], device: torch.device) -> TeacherCacheStore:
    """The stored signal as a TeacherCacheStore of per-example rows on `device` (fitted to each batch)."""
    tensors = load_file(str(path), device=str(device))
    lengths = tensors.pop("lengths").cpu().tolist()
    entries: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for name, packed in tensors.items():
        restored = packed.float() if packed.dtype == torch.float16 else packed
        if name == "extra.attention_mask":
            restored = packed.long()
        entries[name] = list(torch.split(restored, lengths))
    layout = meta.get("layout") or {"hidden": 0, "attn": 0}
    return TeacherCacheStore(entries, {"hidden": int(layout["hidden"]), "attn": int(layout["attn"])})


def cached_teacher_signal(
    teacher: nn.Module,
    adapter: Any,
    data: TaskData,
    spec: Any,
    *,
    device: torch.device,
    temperature: float,
    batch_size: int,
    data_dir: Path,
    owner: str,
    max_bytes: int,
    memory_bytes: int | None,
    stopper: Any,
) -> tuple[TeacherCacheStore | None, dict[str, Any]]:
    """The job's teacher cache from the reusable store (hit), or built by the teacher and stored (miss).

    `memory_bytes` bounds the cache in memory (teacher_cache=auto), as for a job's own cache.
    Returns the cache (None when it is too big for memory) and what the results report:
    {status: hit|miss|not_stored|too_large, key, bytes, tokens, bytes_per_token, teacher_seconds,
    teacher_seconds_saved}.
    """
    config = spec.training_config
    started = time.monotonic()
    key = signal_key(
        teacher,
        data,
        max_seq_length=config.max_seq_length,
        top_k=config.teacher_cache_top_k,
        tail=config.topk_tail,
        temperature=temperature,
    )
    found = load(data_dir, owner, key, device=device)
    # In memory the float16 values are float32 again: about twice the bytes on disk.
    if found is not None and memory_bytes is not None and 2 * int(found[1]["bytes"]) > memory_bytes:
        return None, {"status": "too_large", "key": key.key}
    if found is not None:
        cache, meta = found
        report = _report("hit", meta)
        report["teacher_seconds_saved"] = float(meta["teacher_seconds"])
        report["load_seconds"] = time.monotonic() - started
        return cache, report
    teacher_started = time.monotonic()
    built = TeacherCacheStore.build(
        teacher,
        adapter,
        data,
        spec,
        device=device,
        hidden_states=False,
        attentions=False,
        batch_size=batch_size,
        max_bytes=memory_bytes,
        stopper=stopper,
        temperature=temperature,
    )
    teacher_seconds = time.monotonic() - teacher_started
    if built is None:
        return None, {"status": "too_large", "key": key.key}
    saved = save(
        data_dir,
        owner,
        key,
        built,
        data,
        teacher_name=spec.teacher_model_name,
        task=str(spec.task),
        teacher_seconds=teacher_seconds,
        max_bytes=max_bytes,
        device=device,
    )
    if saved is None:
        return built, {"status": "not_stored", "key": key.key, "teacher_seconds": teacher_seconds}
    cache, meta = saved
    report = _report("miss", meta)
    report["teacher_seconds_saved"] = 0.0
    return cache, report


def _report(status: str, meta: dict[str, Any]) -> dict[str, Any]:
    fields = ("key", "bytes", "tokens", "bytes_per_token", "teacher_seconds", "top_k", "tail")
    return {"status": status, **{name: meta[name] for name in fields}}
