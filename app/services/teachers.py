"""The teacher registry in the database: seeded from DEFAULT_TEACHERS, extended by registrations."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import ColumnElement, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.model_files import UNSAFE_MODEL_FILE, describe_unsafe, unsafe_model_files
from app.core.paths import PathKind, PathRefused, resolve_path, shown
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Teacher
from app.schemas.hub_ids import check_hub_repo_id
from app.schemas.teachers import DEFAULT_TEACHERS, TeacherSource, TeacherSourceKind
from app.schemas.teachers_api import TeacherCreate, TeacherRead
from app.services import file_roots
from app.services.model_info import program_info

logger = logging.getLogger("distillery.teachers")


def seed_default_teachers(session: Session) -> int:
    """Insert the default registry's teachers that are missing; idempotent and safe to race. Returns added."""
    added = 0
    for source in DEFAULT_TEACHERS:
        existing = session.scalar(
            select(Teacher).where(Teacher.name == source.name, Teacher.tenant_id.is_(None))
        )
        if existing is not None:
            if existing.builtin and existing.params is None and source.params is not None:
                existing.params = source.params  # seeded by a version that did not know the count
            continue
        try:
            with session.begin_nested():
                session.add(_row_from_source(source, builtin=True))
            added += 1
        except IntegrityError:
            # Another process seeded the same name between our check and insert: that is the goal.
            logger.info("teacher %s was seeded concurrently", source.name)
    session.commit()
    return added


def _row_from_source(source: TeacherSource, *, builtin: bool) -> Teacher:
    return Teacher(
        name=source.name,
        source_kind=source.kind.value,
        location=source.location,
        type=source.type,
        params=source.params,
        task=source.task,
        description=source.description,
        builtin=builtin,
    )


def _visible_to(tenant_id: str | None) -> ColumnElement[bool]:
    """Global (seeded) teachers plus the tenant's own; None: every teacher (internal callers)."""
    if tenant_id is None:
        return true()
    return or_(Teacher.tenant_id.is_(None), Teacher.tenant_id == tenant_id)


def valid_names(session: Session, *, tenant_id: str | None) -> list[str]:
    query = select(Teacher.name).where(_visible_to(tenant_id)).distinct().order_by(Teacher.name)
    return list(session.scalars(query).all())


def get(session: Session, *, name: str, tenant_id: str | None) -> Teacher | None:
    """The teacher called `name` that the tenant sees: its own, else the global one (None: global only).

    Names are unique per owner. A tenant cannot register a global teacher's name, but a global teacher seeded
    later may share a tenant's name: the tenant's own wins, as it did when the tenant registered it.
    """
    if tenant_id is None:
        return session.scalar(select(Teacher).where(Teacher.name == name, Teacher.tenant_id.is_(None)))
    return session.scalar(
        select(Teacher)
        .where(Teacher.name == name, _visible_to(tenant_id))
        .order_by(Teacher.tenant_id.is_(None))  # own (False) before global (True)
        .limit(1)
    )


def get_or_raise(session: Session, *, name: str, tenant_id: str | None) -> Teacher:
    """The teacher called `name` visible to the tenant, else NotFound listing the names it can use."""
    teacher = get(session, name=name, tenant_id=tenant_id)
    if teacher is None:
        names = valid_names(session, tenant_id=tenant_id)
        raise NotFound(
            f"Teacher '{name}' is not registered. Valid teachers: {', '.join(names) or '(none)'}.",
            valid_teachers=names,
        )
    return teacher


def get_teacher_source(session: Session, name: str, *, tenant_id: str | None) -> TeacherSource:
    """The source a worker loads the teacher `name` from, as the job's tenant sees it (its own, else the
    global one); NotFound (listing the names the tenant can use) if there is none."""
    teacher = get_or_raise(session, name=name, tenant_id=tenant_id)
    return TeacherSource(
        name=teacher.name,
        kind=TeacherSourceKind(teacher.source_kind),
        location=teacher.location,
        type=teacher.type,
        params=teacher.params,
        task=teacher.task,
        description=teacher.description,
    )


def record_measured_params(session: Session, *, name: str, tenant_id: str | None, params: int) -> bool:
    """Store the parameter count a finished job measured on the teacher its tenant used, if the registry did
    not know it (registered without `params`); True when stored. The teacher's next estimate is made from it.
    """
    teacher = get(session, name=name, tenant_id=tenant_id)
    if teacher is None or teacher.params is not None or params <= 0:
        return False
    result = session.execute(
        update(Teacher)
        .where(Teacher.id == teacher.id, Teacher.params.is_(None))
        .values(params=params)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def list_all(session: Session, *, tenant_id: str | None) -> list[Teacher]:
    """The global teachers and the tenant's own, built-in first; a global one the tenant's own shadows (same
    name, seeded after the tenant registered it) is left out, as `get` would never answer it."""
    query = select(Teacher).where(_visible_to(tenant_id))
    if tenant_id is not None:
        own_names = select(Teacher.name).where(Teacher.tenant_id == tenant_id)
        query = query.where(~(Teacher.tenant_id.is_(None) & Teacher.name.in_(own_names)))
    return list(session.scalars(query.order_by(Teacher.builtin.desc(), Teacher.name)).all())


def register(
    session: Session, *, request: TeacherCreate, settings: Settings, tenant_id: str | None
) -> Teacher:
    """Register a local directory (checked now, under the tenant's file root) or a hub id (format only).

    A local location is stored relative to the tenant's file root; the worker resolves it there again.

    Names are unique across tenants (workers resolve a job's teacher by name), so a name another tenant
    registered answers 409 like any taken name, without saying whose it is.
    """
    if request.kind == "local":
        try:
            directory, root = file_roots.resolve_for_tenant(
                session,
                settings=settings,
                tenant_id=tenant_id,
                text=request.location,
                # A torch.export program is one .pt2 file; every other model is a directory.
                kind=PathKind.file if request.location.endswith(".pt2") else PathKind.directory,
                what="Teacher program" if request.location.endswith(".pt2") else "Teacher directory",
            )
        except PathRefused as exc:
            raise _location_error(exc.message, exc.code) from exc
        location = file_roots.stored_form(directory, root)
        if directory.is_file():
            if directory.suffix != ".pt2":
                raise _location_error(
                    f"'{location}' is a file; a model is a directory (save_pretrained, or safetensors + "
                    "student_config.json) or a torch.export program (.pt2).",
                    "teacher_invalid",
                )
            _check_program(directory, location)
        elif not any((directory / n).is_file() for n in ("config.json", "student_config.json")):
            raise _location_error(
                f"Teacher directory '{location}' has no config.json; save the model with save_pretrained() "
                "(or give a finished job's artifacts: safetensors + student_config.json).",
                "teacher_invalid",
            )
        unsafe = unsafe_model_files(directory) if directory.is_dir() else {}  # opcodes read, never unpickled
        if unsafe:
            message = f"Teacher directory '{location}': {describe_unsafe(unsafe)}"
            raise _location_error(message, UNSAFE_MODEL_FILE)
    else:
        try:
            location = check_hub_repo_id(request.location)
        except ValueError as exc:
            raise _location_error(str(exc), "hub_id_invalid") from exc
    if get(session, name=request.name, tenant_id=tenant_id) is not None:
        raise Conflict(_taken(request.name))
    teacher = Teacher(
        name=request.name,
        source_kind=request.kind,
        location=location,
        type=request.type,
        params=request.params,
        task=request.task.value if request.task else None,
        description=request.description,
        builtin=False,
        tenant_id=tenant_id,
    )
    session.add(teacher)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(_taken(request.name)) from exc
    return teacher


def _taken(name: str) -> str:
    """The 409 of a name the tenant already sees (its own or a global one; never another tenant's)."""
    return f"A teacher named '{name}' is already registered (GET /distillation/teachers/{name} shows it)."


def _check_program(path: Path, location: str) -> None:
    """A .pt2 must be a torch.export archive with one floating tensor input and (batch, C) logits.

    Read from the program's JSON inside the archive (no torch, nothing unpickled); the worker loads it with
    torch.export.load and checks it again against the job's data.
    """
    info = program_info(path)
    if info is None:
        raise _location_error(
            f"'{location}' is not a torch.export archive (write it with torch.export.save(program, path)).",
            "teacher_invalid",
        )
    if len(info.inputs) != 1 or not info.inputs[0][1].startswith(("float", "bfloat")):
        described = [(["batch", *sizes[1:]], dtype) for sizes, dtype in info.inputs]
        raise _location_error(
            f"'{location}' takes inputs {described}; a teacher program takes one floating point tensor "
            "(batch, ...) and returns logits.",
            "teacher_invalid",
        )
    if len(info.outputs) != 1 or len(info.outputs[0]) != 2:
        raise _location_error(
            f"'{location}' returns {info.outputs}; a teacher program returns logits (batch, C).",
            "teacher_invalid",
        )


def _location_error(message: str, code: str) -> Unprocessable:
    return Unprocessable(
        f"location: {message}",
        errors=[{"loc": ["body", "location"], "field": "location", "msg": message, "type": code}],
    )


def to_read(teacher: Teacher, *, file_root: Path | None = None) -> TeacherRead:
    """The API view; `available_offline`: built-in, or a local directory that exists under `file_root`.

    Local locations are shown relative to the file root (rows from before the root rule: by name only).
    """
    location = teacher.location
    available = teacher.source_kind == TeacherSourceKind.builtin
    if teacher.source_kind == TeacherSourceKind.local:
        if Path(location).is_absolute():
            location = shown(Path(location), file_root)
        if file_root is not None:
            try:
                resolve_path(teacher.location, root=file_root, kind=PathKind.any)
                available = True
            except PathRefused:
                available = False
    return TeacherRead(
        name=teacher.name,
        kind=teacher.source_kind,
        location=location,
        type=teacher.type,
        params=teacher.params,
        task=teacher.task,
        description=teacher.description,
        builtin=teacher.builtin,
        available_offline=available,
        created_at=teacher.created_at,
    )
