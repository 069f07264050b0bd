"""Model weight files that could carry code: found without torch and without unpickling anything.

A `pytorch_model.bin` (or `.pt`/`.pth`/`.ckpt`) is a pickle: loading it may call any importable function.
`unsafe_globals` reads its opcodes with `pickletools` (inside the zip archive of torch's current format, or
the consecutive pickles of the legacy format) and lists every global it would import that a weights-only
load does not need. Safetensors files hold tensors only and are always preferred.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

UNSAFE_MODEL_FILE = "unsafe_model_file"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The legacy torch format is a few pickles in a row (magic, protocol, sys info, the object, storage keys).
_MAX_LEGACY_PICKLES = 5
# Opcodes are read from at most this much of a file (a state dict's pickle holds names and storage keys,
# not tensor data); a truncated stream ends the scan with what was found so far.
_MAX_SCAN_BYTES = 64 * 1024 * 1024

# What torch's weights-only unpickler itself allows for a state dict: tensors, storages, dtypes, devices.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
}
_TORCH_DTYPES = {
    "float16", "float32", "float64", "bfloat16", "half", "float", "double", "complex64", "complex128",
    "uint8", "int8", "int16", "int32", "int64", "bool", "qint8", "quint8", "qint32",
}  # fmt: skip


def conversion_hint(name: str) -> str:
    return (
        f"convert it to safetensors where you trust it: `model = AutoModel.from_pretrained(dir); "
        f"model.save_pretrained(dir, safe_serialization=True)` and delete {name} (or give a directory "
        "with model.safetensors)"
    )


def _is_safe(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    return module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES)


_STRING_PUSHES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "SHORT_BINSTRING"}
_MEMO_GETS = {"BINGET", "LONG_BINGET", "GET"}
_MEMO_PUTS = {"BINPUT", "LONG_BINPUT", "PUT"}


def _globals_in(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(module, name) of each GLOBAL / INST / STACK_GLOBAL in one pickle, without executing it.

    STACK_GLOBAL takes its two strings from the stack: they count only when the two value pushes right
    before it (memo stores aside) are strings; anything else is reported as '?.?', i.e. unsafe.
    """
    recent: list[str | None] = []  # the values of the last pushes since any other opcode
    memo: dict[int, str | None] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in {"GLOBAL", "INST"} and isinstance(arg, str):
            module, _, attribute = arg.partition(" ")
            yield module, attribute
            recent = []
        elif name == "STACK_GLOBAL":
            pair = recent[-2:]
            if len(pair) == 2 and pair[0] is not None and pair[1] is not None:
                yield pair[0], pair[1]
            else:
                yield "?", "?"
            recent = []
        elif name in _STRING_PUSHES:
            recent.append(str(arg))
        elif name in _MEMO_GETS and isinstance(arg, int):
            recent.append(memo.get(arg))
        elif name in _MEMO_PUTS and isinstance(arg, int):
            memo[arg] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        else:
            recent = []


def unsafe_globals(path: Path) -> list[str]:
    """The code-importing globals a pickle-based weight file names ('module.name'); [] if none or unreadable
    as a pickle (the loader then reports what it finds)."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        with archive.open(member) as handle:
                            found += _scan(io.BytesIO(handle.read(_MAX_SCAN_BYTES)), pickles=1)
        else:
            with path.open("rb") as handle:
                found += _scan(io.BytesIO(handle.read(_MAX_SCAN_BYTES)), pickles=_MAX_LEGACY_PICKLES)
    except (OSError, zipfile.BadZipFile):
        return found
    return sorted(set(found))


def _scan(stream: IO[bytes], *, pickles: int) -> list[str]:
    found: list[str] = []
    for _ in range(pickles):
        try:
            found += [f"{m}.{n}" for m, n in _globals_in(stream) if not _is_safe(m, n)]
        except (ValueError, EOFError, IndexError, UnicodeDecodeError):
            break  # the end of the pickles (raw storage bytes follow in the legacy format)
    return found


def pickle_weight_files(directory: Path) -> list[Path]:
    """Pickle-based weight files in a model directory (not recursing)."""
    try:
        return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    except OSError:
        return []


def has_safetensors(directory: Path) -> bool:
    try:
        return any(p.suffix == ".safetensors" and p.is_file() for p in directory.iterdir())
    except OSError:
        return False


def unsafe_model_files(directory: Path) -> dict[str, list[str]]:
    """{file name: unsafe globals} for the pickles a loader would read from `directory`.

    Empty when the directory has safetensors weights (those are loaded, the pickles never opened).
    """
    if has_safetensors(directory):
        return {}
    report: dict[str, list[str]] = {}
    for path in pickle_weight_files(directory):
        found = unsafe_globals(path)
        if found:
            report[path.name] = found
    return report


def describe_unsafe(report: dict[str, list[str]]) -> str:
    """One sentence saying what was found and how to convert, for an error message."""
    name, found = next(iter(report.items()))
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return (
        f"{name} is a pickle that would import and run code ({shown}) when loaded, so it is refused; "
        + conversion_hint(name)
    )
