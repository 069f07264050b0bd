"""Reading model files without torch, for checks at create time: configs, vocabularies, `.pt2` signatures.

Everything here reads JSON or text: `config.json` / `student_config.json`, a tokenizer's vocabulary
(`tokenizer.json`, `vocab.txt` or `vocab.json`), and the program JSON inside a `torch.export.save` archive
(a zip: `<name>/models/*.json` holds the graph's input and output tensor specs). A file that cannot be read
this way returns None: the worker then checks it with the real libraries before training.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch.export's serialized ScalarType codes (torch/_export/serde/schema.py) for the dtypes we name.
_SCALAR_TYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    12: "bool",
    13: "bfloat16",
}
MAX_JSON_BYTES = 64 * 2**20


def probe(check: Callable[[], bool]) -> bool:
    """A filesystem predicate that is False, not an error, for names the OS refuses (too long, ...)."""
    try:
        return bool(check())
    except OSError:
        return False


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is absent, too large or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def hf_config(directory: Path) -> dict[str, Any] | None:
    """A save_pretrained directory's config.json (a transformers config has a model_type)."""
    config = read_json(directory / "config.json")
    return config if config is not None and "model_type" in config else None


def vocabulary(directory: Path) -> dict[str, int] | None:
    """Token -> id of a tokenizer saved in `directory`, from tokenizer.json, vocab.txt or vocab.json."""
    tokenizer = read_json(directory / "tokenizer.json")
    if tokenizer is not None:
        vocab = (tokenizer.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            merged = {str(k): int(v) for k, v in vocab.items()}
        elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
            merged = {str(entry[0]): i for i, entry in enumerate(vocab)}
        else:
            return None
        for added in tokenizer.get("added_tokens") or []:
            merged[str(added["content"])] = int(added["id"])
        return merged
    try:  # WordPiece: one token per line, the id is the line number
        lines: list[str] | None = (directory / "vocab.txt").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = None
    except (OSError, UnicodeDecodeError):
        return None
    if lines is not None:
        return {token: i for i, token in enumerate(lines)}
    mapping = read_json(directory / "vocab.json")
    if mapping is not None:
        return {str(k): int(v) for k, v in mapping.items()}
    return None


def vocabulary_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    """None when equal; else sizes, tokens only one side has, and tokens with other ids."""
    if teacher == student:
        return None
    only_teacher = sorted(set(teacher) - set(student))
    only_student = sorted(set(student) - set(teacher))
    moved = sorted(t for t in set(teacher) & set(student) if teacher[t] != student[t])
    parts = [f"teacher {len(teacher)} tokens, student {len(student)}"]
    if only_teacher:
        parts.append(f"only in the teacher's: {only_teacher[:5]}")
    if only_student:
        parts.append(f"only in the student's: {only_student[:5]}")
    if moved:
        parts.append(f"{len(moved)} tokens with other ids, e.g. {moved[:3]}")
    first = first_differing_ids(teacher, student)
    if first:
        parts.append("first differing ids: " + ", ".join(f"{i} {t!r} vs {s!r}" for i, t, s in first))
    return "; ".join(parts)


def first_differing_ids(
    teacher: dict[str, int], student: dict[str, int], count: int = 3
) -> list[tuple[int, str | None, str | None]]:
    """The lowest ids whose token differs: (id, teacher's token, student's token; None where it has none)."""
    by_id_teacher = {i: t for t, i in teacher.items()}
    by_id_student = {i: t for t, i in student.items()}
    found: list[tuple[int, str | None, str | None]] = []
    for i in sorted(set(by_id_teacher) | set(by_id_student)):
        if by_id_teacher.get(i) != by_id_student.get(i):
            found.append((i, by_id_teacher.get(i), by_id_student.get(i)))
            if len(found) == count:
                break
    return found


@dataclass(frozen=True)
class ProgramInfo:
    """A `.pt2` program's user inputs (dims after the batch, dtype) and outputs, read from its JSON."""

    inputs: list[tuple[list[int | None], str]]  # per input: sizes (None = symbolic), dtype name
    outputs: list[list[int | None]]
    parameters: int

    @property
    def in_features(self) -> int | None:
        """Values per example of the single input (None: symbolic sizes beyond the batch)."""
        if len(self.inputs) != 1:
            return None
        sizes = self.inputs[0][0][1:]
        if any(size is None for size in sizes):
            return None
        total = 1
        for size in sizes:
            total *= int(size or 0)
        return total


def _sizes(spec: dict[str, Any]) -> list[int | None]:
    return [entry.get("as_int") if "as_int" in entry else None for entry in spec.get("sizes", [])]


def program_info(path: Path) -> ProgramInfo | None:
    """The signature of a torch.export archive, or None when the file is not one we can read as JSON."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if "/models/" in n and n.endswith(".json")]
            if not names:
                return None
            info = archive.getinfo(names[0])
            if info.file_size > MAX_JSON_BYTES:
                return None
            document = json.loads(archive.read(names[0]))
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, KeyError):
        return None
    try:
        graph = document["graph_module"]["graph"]
        values = graph["tensor_values"]
        signature = document["graph_module"]["signature"]
        inputs: list[tuple[list[int | None], str]] = []
        parameters = 0
        for spec in signature["input_specs"]:
            if "user_input" in spec:
                tensor = spec["user_input"]["arg"].get("as_tensor")
                if tensor is None:
                    continue
                value = values[tensor["name"]]
                inputs.append((_sizes(value), _SCALAR_TYPES.get(int(value.get("dtype", 0)), "unknown")))
            elif "parameter" in spec:
                sizes = _sizes(values[spec["parameter"]["arg"]["name"]])
                count = 1
                for size in sizes:
                    count *= int(size or 0)
                parameters += count
        outputs = []
        for spec in signature["output_specs"]:
            tensor = (spec.get("user_output") or {}).get("arg", {}).get("as_tensor")
            if tensor is not None:
                outputs.append(_sizes(values[tensor["name"]]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return ProgramInfo(inputs=inputs, outputs=outputs, parameters=parameters)
