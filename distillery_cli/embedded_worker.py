"""`python -m distillery_cli.embedded_worker CELERY-WORKER-ARGS`: the Celery worker of `distillery up`.

The same worker as `celery -A workers.celery_app worker`, with three differences that make a local stack
stop promptly and leave nothing behind:

- An idle worker leaves its broker poll at once on SIGTERM. With a polling transport (the embedded
  filesystem broker) Celery checks for shutdown only between 2 s drains; when no task is active or reserved
  the shutdown signal raises WorkerShutdown right away instead. A worker with a task keeps Celery's warm
  shutdown (the task finishes; `distillery up` bounds the wait, and a killed job is re-queued from its last
  checkpoint by the scheduler once its heartbeat is stale: the database is the source of truth).
- The process ends with `os._exit` once Celery has stopped (its shutdown hooks have run and the worker's
  heartbeat row is removed): collecting the garbage of torch's module graph at interpreter exit took
  seconds and does nothing for a process about to end.
- Pool processes die with the worker (PR_SET_PDEATHSIG), as the worker dies with `distillery up`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from celery import signals
from celery.exceptions import WorkerShutdown

from distillery_cli.guard import set_parent_death_signal


@signals.worker_shutting_down.connect
def _stop_now_when_idle(how: str | None = None, exitcode: int | None = None, **_: Any) -> None:
    """Runs inside Celery's SIGTERM handler in the main process: leave the broker poll now if idle."""
    from celery.worker import state

    if how == "Warm" and not state.active_requests and not state.reserved_requests:
        raise WorkerShutdown(exitcode or 0)


@signals.worker_process_init.connect
def _die_with_the_worker(**_: Any) -> None:
    set_parent_death_signal(signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Run the worker with `argv` (what follows `celery worker`); returns its exit code."""
    from workers.celery_app import celery_app

    # Retry the broker at start-up, as Celery does today; saying so explicitly silences the warning that
    # this default changes in Celery 6.
    celery_app.conf.broker_connection_retry_on_startup = True
    try:
        code = celery_app.start(["worker", *argv])  # click's Exit becomes the return value
    except SystemExit as exc:
        code = exc.code
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
