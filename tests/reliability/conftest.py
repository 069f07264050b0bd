"""Reliability fixtures: the integration fixtures (real worker/scheduler processes), re-used as they are."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
if str(_INTEGRATION) not in sys.path:
    sys.path.insert(0, str(_INTEGRATION))

_spec = importlib.util.spec_from_file_location("integration_conftest", _INTEGRATION / "conftest.py")
assert _spec is not None and _spec.loader is not None
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)

# Fixtures (and the report hook the `stack` fixture reads) are found by name in this module.
api = _integration.api
digits_teacher = _integration.digits_teacher
empty_jobs = _integration.empty_jobs
shared_worker = _integration.shared_worker
stack = _integration.stack
pytest_runtest_makereport = _integration.pytest_runtest_makereport
