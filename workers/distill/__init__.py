"""The distillation engine: real teacher-student training. Knows nothing of HTTP, SQL or Celery.

Entry point: `workers.distill.runner.run_job(spec, ...)`; the callback contract is in `contract.py`.
"""
