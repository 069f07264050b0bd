"""The process pool that runs an upload's check off the API's GIL: another process, exceptions carried back
intact, a dead process reported and replaced, and a fresh pool after shutdown."""

from __future__ import annotations

import os

import pytest

from app.core import cpu_pool
from app.errors import Unprocessable


def _refuse(detail: str) -> None:
    raise Unprocessable(detail, errors=[{"loc": ["body", "file"], "line": 3}])


def test_a_call_runs_in_another_process_and_its_problem_comes_back_whole() -> None:
    try:
        child = cpu_pool.run(os.getpid)
        assert isinstance(child, int) and child != os.getpid()
        with pytest.raises(Unprocessable) as refused:
            cpu_pool.run(_refuse, "line 3: not JSON")
        assert refused.value.detail == "line 3: not JSON"
        assert refused.value.extras == {"errors": [{"loc": ["body", "file"], "line": 3}]}
        with pytest.raises(cpu_pool.CheckProcessDied):
            cpu_pool.run(os._exit, 1)  # the process dies mid-call (as the OOM killer would do it)
        assert cpu_pool.run(os.getpid) != child  # a new pool answers the next call
    finally:
        cpu_pool.shutdown()
    assert cpu_pool.run(os.getpid) != os.getpid()  # and after a shutdown, too
    cpu_pool.shutdown()
