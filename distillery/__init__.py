"""The Distillery SDK: `Client` for a Distillery server's REST API (jobs, events, artifacts).

    from distillery import Client

    with Client() as client:
        job = client.create("examples/digits.json", auto_start=True)
        job = client.wait(job["job_id"])
        print(job["results"]["student_accuracy"])

Errors are `distillery.errors` classes (ApiError with `status` and `problem`, and one per status a caller
handles differently). The URL and key come from the arguments, else DISTILLERY_URL / DISTILLERY_API_KEY,
else the config file `distillery login` writes (see `distillery.config`).
"""

from distillery.client import Artifact, Client, Event, Job, Page, Retry, RetryPolicy
from distillery.errors import (
    ApiError,
    AuthenticationError,
    ConflictError,
    DistilleryError,
    InvalidRequestError,
    NoArtifactsError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
    StreamUnavailableError,
    TransportError,
)

__all__ = [
    "ApiError",
    "Artifact",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "DistilleryError",
    "Event",
    "InvalidRequestError",
    "Job",
    "NoArtifactsError",
    "NotFoundError",
    "Page",
    "PermissionDeniedError",
    "RateLimitedError",
    "Retry",
    "RetryPolicy",
    "ServerError",
    "StreamUnavailableError",
    "TransportError",
]
