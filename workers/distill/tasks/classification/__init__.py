"""Classification of numeric inputs: digits (built in) or a numeric table; CNN/MLP teachers, scaled students.

`data` reads and splits the rows, `models` holds the CNN/MLP families, `teachers` builds the built-in
digits-cnn once per data dir, `adapter` is the `TaskAdapter` registered here.
"""

from __future__ import annotations

from app.schemas.job_spec import Task
from workers.distill.registry import register_adapter
from workers.distill.tasks.classification.adapter import ClassificationAdapter

register_adapter(Task.classification, ClassificationAdapter)
