"""The task registry: one adapter per task, registered by its package under `workers.distill.tasks`.

`classification` is always there; the transformer tasks register when `transformers` is installed.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from app.schemas.job_spec import Task
from workers.distill.adapter import TaskAdapter
from workers.distill.contract import EngineError

logger = logging.getLogger(__name__)

AdapterFactory = Callable[[], TaskAdapter]

_ADAPTERS: dict[Task, AdapterFactory] = {}
# Modules that register more adapters when imported; a missing or broken one never breaks the others.
_OPTIONAL_MODULES = ("workers.distill.tasks.transformers", "workers.distill.tasks.vision")
_loaded_optional = False


def register_adapter(task: Task, factory: AdapterFactory) -> None:
    """Register the adapter factory for `task`; registering a task twice is an error."""
    if task in _ADAPTERS:
        raise ValueError(f"an adapter for task '{task}' is already registered")
    _ADAPTERS[task] = factory


def _load_optional() -> None:
    global _loaded_optional
    if _loaded_optional:
        return
    _loaded_optional = True
    import workers.distill.tasks.classification  # noqa: F401  (registers 'classification')

    for module in _OPTIONAL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                logger.warning("adapter module %s failed to import: %s", module, exc)
        except Exception as exc:  # a broken optional module must not take digits down; logged, not swallowed
            logger.warning("adapter module %s failed to import: %r", module, exc)


def registered_tasks() -> list[str]:
    """Tasks with an adapter."""
    _load_optional()
    return sorted(str(task) for task in _ADAPTERS)


def get_adapter(task: Task | str) -> TaskAdapter:
    """A fresh adapter for `task`; EngineError('unsupported') naming the valid tasks otherwise."""
    _load_optional()
    try:
        factory = _ADAPTERS[Task(task)]
    except (KeyError, ValueError):
        valid = ", ".join(registered_tasks())
        message = f"no engine support for task '{task}'; valid tasks: {valid}"
        raise EngineError("unsupported", message) from None
    return factory()
