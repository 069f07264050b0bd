"""What the SDK raises: one base class, one subclass per kind of answer a caller handles differently."""

from __future__ import annotations

from typing import Any


class DistilleryError(Exception):
    """Base class of every error the SDK raises."""


class TransportError(DistilleryError):
    """The server could not be reached (or the connection dropped) after the retries."""


class ApiError(DistilleryError):
    """The server answered with an error (RFC 9457 problem+json when it could say more).

    `status` is the HTTP status; `problem` the decoded body (`title`, `detail`, `errors` for a 422,
    extras such as `valid_teachers` or `retry_after`); `errors` the field errors, each with `loc`,
    `field`, `msg` and `type`.
    """

    def __init__(self, status: int, problem: dict[str, Any], *, method: str = "", path: str = "") -> None:
        self.status = status
        self.problem = problem
        self.method = method
        self.path = path
        self.title = str(problem.get("title") or "")
        self.detail = str(problem.get("detail") or "")
        errors = problem.get("errors")
        self.errors: list[dict[str, Any]] = errors if isinstance(errors, list) else []
        super().__init__(f"{status} {self.title}: {self.detail}" if self.detail else f"{status} {self.title}")


class AuthenticationError(ApiError):
    """401: no key, or a key the server does not accept (unknown or revoked)."""


class PermissionDeniedError(ApiError):
    """403: the key is valid but may not do this."""


class NotFoundError(ApiError):
    """404: no such job (or not one of this key's tenant)."""


class ConflictError(ApiError):
    """409: the job is not in a state that allows this (start a running job, an ambiguous id prefix)."""


class InvalidRequestError(ApiError):
    """422: the spec or a parameter is invalid; `errors` names each field."""


class RateLimitedError(ApiError):
    """429 after every retry: the queue stayed full (`retry_after` seconds was the server's advice)."""

    @property
    def retry_after(self) -> float | None:
        value = self.problem.get("retry_after")
        return float(value) if isinstance(value, int | float) else None


class ServerError(ApiError):
    """5xx after every retry."""


class NoArtifactsError(DistilleryError):
    """`download` of a job that has no artifacts (yet): nothing was written."""

    def __init__(self, job_id: str, status: str | None) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(
            f"job {job_id} has no artifacts (status {status}): they are written when a job completes"
        )


class StreamUnavailableError(DistilleryError):
    """The event stream cannot be used (an old server, a proxy, repeated drops); poll instead."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
    429: RateLimitedError,
}


def error_for(status: int, problem: dict[str, Any], *, method: str = "", path: str = "") -> ApiError:
    """The ApiError subclass for `status`."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, problem, method=method, path=path)
