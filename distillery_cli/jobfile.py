"""Reading job files, and saying what is wrong with them in one line each, with a suggestion where it helps.

Shared by `distillery run` (validates locally) and `distillery submit` (the server validates; its 422 errors
are explained the same way). Field suggestions come from the job spec model itself (pydantic only, no
torch), at the level the misspelled field sits.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel


class JobFileError(Exception):
    """The job file cannot be used; the message is one line naming the file (and line:column for JSON)."""


def load_job_file(path: Path) -> dict[str, Any]:
    """The job file's JSON object, or a JobFileError like `job.json:3:17: invalid JSON: Expecting ','`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise JobFileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise JobFileError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobFileError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(document, dict):
        raise JobFileError(f"{path}: a job file holds one JSON object, not {type(document).__name__}")
    return document


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, Annotated, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    if origin is not None:  # Union, X | Y, list[...], dict[...]: look inside
        return [model for arg in get_args(annotation) for model in _models_in(arg)]
    return []


def _tag_matches(model: type[BaseModel], tag: str) -> bool:
    """Whether a union member's discriminator (a Literal field) has the value `tag`."""
    for info in model.model_fields.values():
        if get_origin(info.annotation) is Literal and tag in get_args(info.annotation):
            return True
    return False


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def fields_at(model: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    """The field names valid at `path` inside `model` (`["training_config"]` -> TrainingConfig's fields).

    Pydantic puts a union member's tag in error locations (`dataset_config.builtin.name`); a part that
    is no field but a member's tag narrows the union to that member.
    """
    models = [model]
    for part in path:
        if isinstance(part, int):
            continue  # a list index: same models
        inner = [
            found
            for current in models
            for name, info in current.model_fields.items()
            if part in (name, info.alias)
            for found in _models_in(info.annotation)
        ]
        if inner:
            models = inner
        else:
            tagged = [current for current in models if _tag_matches(current, part)]
            if not tagged:
                return []
            models = tagged
    return list(dict.fromkeys(name for current in models for name in _field_names(current)))


def suggest_field(model: type[BaseModel], loc: Sequence[str | int]) -> str | None:
    """The valid field name nearest to the misspelled last part of `loc`, if one is close enough."""
    if not loc or not isinstance(loc[-1], str):
        return None
    matches = difflib.get_close_matches(loc[-1], fields_at(model, loc[:-1]), n=1, cutoff=0.6)
    return matches[0] if matches else None


def describe_errors(errors: Iterable[Mapping[str, Any]], model: type[BaseModel] | None) -> list[str]:
    """One line per validation error (pydantic's or a problem+json `errors` entry): `field: message`.

    An unknown field (`extra_forbidden`) says so and names the nearest valid field of that level.
    """
    lines = []
    for error in errors:
        loc = [part for part in error.get("loc") or [] if isinstance(part, str | int)]
        if loc and loc[0] == "body":
            loc = loc[1:]
        where = ".".join(str(part) for part in loc) or "(job)"
        message = str(error.get("msg") or error)
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
            nearest = suggest_field(model, loc) if model is not None else None
            if nearest is not None:
                message += f"; did you mean '{nearest}'?"
            elif model is not None and loc:
                valid = fields_at(model, loc[:-1])
                if valid:
                    message += f"; valid here: {', '.join(valid)}"
        lines.append(f"{where}: {message}")
    return lines


def job_request_model() -> type[BaseModel] | None:
    """The server's job request model when this install has it (it does: app.schemas is pydantic-only)."""
    try:
        from app.schemas.jobs import JobCreate
    except ImportError:
        return None
    return JobCreate
