"""The distillation engine: real teacher-student training. Knows nothing of HTTP, SQL or Celery.

Entry point: `workers.distill.runner.run_job(spec, ..., config=EngineConfig(...))`; the callback contract
is in `contract.py`. Kernel (`kernel`, `adapter`, `registry`, `losses`, `contract`, `config`) imports no
task; each task is a package under `tasks/` that registers its adapter; `loop`, `teacher_cache`,
`checkpoint`, `compress` and `metrics` do one job each; `runner` runs the phases.
"""
