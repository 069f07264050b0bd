"""Task image-classification: transformers image classifiers and `.pt2` programs (registers its adapter)."""

from app.schemas.job_spec import Task
from workers.distill.registry import register_adapter
from workers.distill.tasks.vision.adapter import ImageClassificationAdapter

register_adapter(Task.image_classification, ImageClassificationAdapter)
