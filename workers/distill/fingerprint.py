"""Content fingerprints of models and tokenised data: keys of the caches that outlive a job."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def update_with_tensors(digest: hashlib._Hash, tensors: dict[str, torch.Tensor]) -> None:
    """Feed names, dtypes, shapes and bytes of `tensors` (sorted by name) into `digest`."""
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's class and state_dict (weights and buffers): equal only for the same weights."""
    digest = hashlib.sha256(type(model).__name__.encode())
    update_with_tensors(digest, dict(model.state_dict()))
    return digest.hexdigest()


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a dict of tensors (e.g. a tokenised split)."""
    digest = hashlib.sha256()
    update_with_tensors(digest, tensors)
    return digest.hexdigest()
