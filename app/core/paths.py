"""Paths people give us (a `file` dataset, a local teacher directory): checked and resolved in one place.

Torch-free, and used by the API services, the worker and the `distillery run` CLI alike; each side wraps
`PathRefused` in its own error type (a 422 naming the field in the API, `EngineError` in the engine).

One meaning everywhere: the text must be a plain path (no NUL or control characters, no `~` to expand);
with a root, a relative path is taken relative to the root, symlinks are followed, and the result must lie
under the root; without one (the local CLI, where the caller owns the machine) a relative path is taken
relative to the working directory. Messages name paths as the caller gave them or relative to the root,
never the server's absolute paths.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

MAX_PATH_LENGTH = 4096


class PathKind(StrEnum):
    """What must exist at the resolved path."""

    file = "file"
    directory = "directory"
    any = "any"


class PathRefused(ValueError):
    """A path that cannot be used; `code` is stable (path_invalid, path_outside_root, path_not_found)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_path_text(text: str) -> None:
    """Refuse text that is not a plain path: empty, too long, NUL or control characters, a leading `~`."""
    if not text or not text.strip():
        raise PathRefused("path_invalid", "the path is empty")
    if len(text) > MAX_PATH_LENGTH:
        raise PathRefused("path_invalid", f"the path is longer than {MAX_PATH_LENGTH} characters")
    if "\x00" in text:
        raise PathRefused("path_invalid", "the path contains a NUL byte")
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise PathRefused("path_invalid", "the path contains a control character (newline, tab, ...)")
    if text.startswith("~"):
        raise PathRefused(
            "path_invalid",
            f"'{text}' starts with '~'; home directories are not expanded: give a path relative to the "
            "allowed root (or an absolute one)",
        )


def shown(path: Path, root: Path | None) -> str:
    """How a resolved path is named in messages: relative to the root when there is one."""
    if root is not None:
        try:
            return path.relative_to(root.resolve()).as_posix() or "."
        except ValueError:
            return path.name
    return str(path)


def resolve_path(text: str, *, root: Path | None, kind: PathKind = PathKind.any, what: str = "path") -> Path:
    """`text` checked and resolved (symlinks followed); under `root` when one is given; must exist as `kind`.

    Raises PathRefused; its message names `what` and the path relative to the root, never absolute paths.
    """
    check_path_text(text)
    candidate = Path(text)
    root_resolved: Path | None = None
    try:
        if root is not None:
            root_resolved = root.resolve()
            if not candidate.is_absolute():
                candidate = root_resolved / candidate
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long for the file system
        reason = type(exc).__name__
        raise PathRefused("path_invalid", f"{what} '{text}' cannot be resolved ({reason})") from exc
    if root_resolved is not None and not resolved.is_relative_to(root_resolved):
        raise PathRefused(
            "path_outside_root",
            f"{what} '{text}' is outside the allowed root (paths are taken relative to it, symlinks "
            "followed)",
        )
    try:
        exists = {
            PathKind.file: resolved.is_file,
            PathKind.directory: resolved.is_dir,
            PathKind.any: resolved.exists,
        }[kind]()
    except OSError as exc:
        raise PathRefused("path_invalid", f"{what} '{text}' cannot be read ({type(exc).__name__})") from exc
    if not exists:
        noun = {PathKind.file: "file", PathKind.directory: "directory", PathKind.any: "file or directory"}
        where = shown(resolved, root_resolved) if root_resolved is not None else text
        suffix = " under the allowed root" if root_resolved is not None else ""
        raise PathRefused("path_not_found", f"{what}: No {noun[kind]} at '{where}'{suffix}")
    return resolved


def tenant_file_root(root: Path | None, *, per_tenant: bool, tenant_name: str | None) -> Path | None:
    """The file root of one tenant: `root`, or `root/<tenant name>` in the per-tenant layout (None: none)."""
    if root is None:
        return None
    if not per_tenant:
        return root
    if not tenant_name:
        return None  # a job without a tenant has no folder of its own
    check_path_text(tenant_name)
    if "/" in tenant_name or tenant_name in {".", ".."}:
        raise PathRefused("path_invalid", f"tenant name '{tenant_name}' cannot name a folder")
    return root / tenant_name


def overlaps(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths lies inside the other (or they are the same)."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def redact_paths(message: str, paths: dict[Path, str]) -> str:
    """`message` with each absolute path in `paths` replaced by its label (longest first)."""
    for path, label in sorted(paths.items(), key=lambda item: len(str(item[0])), reverse=True):
        message = message.replace(str(path), label)
    return message
