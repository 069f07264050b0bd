"""Post-training compression: global magnitude pruning, then int8 dynamic quantization, each re-measured.

`student.pt2` stays the fp32 (pruned) student. The int8 student is written as plain tensors
(`student_int8.safetensors`: int8 weights, per-tensor scale and zero point, fp32 everything else) plus a JSON
recipe, and rebuilt by `load_int8_student` on top of the fp32 architecture: no pickled objects anywhere.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune

from app.schemas.job_spec import JobSpec
from workers.distill.adapter import TaskAdapter
from workers.distill.contract import EngineCallbacks, JobStopped, Progress
from workers.distill.kernel import Batch, TaskData, iterate_batches
from workers.distill.metrics import measure_latency_ms

INT8_WEIGHTS = "student_int8.safetensors"
INT8_RECIPE = "student_int8.json"
_EVAL_BATCH = 64
_LATENCY_BATCHES = (1, 64)


def _conv1d_class() -> type[nn.Module] | None:
    """transformers' GPT-2 Conv1D (a linear layer with a transposed weight), when transformers is present."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def convert_conv1d_to_linear(model: nn.Module) -> int:
    """Replace GPT-2 Conv1D layers by equivalent nn.Linear (weight transposed) so they prune and quantize."""
    conv1d = _conv1d_class()
    if conv1d is None:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, conv1d):
                weight = _weight(child)  # (in, out)
                bias = child.bias
                assert isinstance(bias, torch.Tensor)
                linear = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(weight.t())
                    linear.bias.copy_(bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _linear_types() -> tuple[type[nn.Module], ...]:
    conv1d = _conv1d_class()
    return (nn.Linear, conv1d) if conv1d is not None else (nn.Linear,)


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear (and GPT-2 Conv1D) layers whose weight is their own (a head tied to embeddings stays dense)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _linear_types()) and id(module.weight) not in embedding_ids
    ]


def global_magnitude_prune(model: nn.Module, amount: float) -> dict[str, float]:
    """Zero the `amount` fraction of smallest-magnitude Linear weights across the model, permanently.

    Module types and parameter names are unchanged, so the pruned student saves and reloads as before.
    """
    linears = prunable_linears(model)
    targets = [(module, "weight") for _, module in linears]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)  # weight becomes a plain parameter holding the zeros
    total = sum(_weight(module).numel() for _, module in linears)
    zeros = sum(int((_weight(module) == 0).sum()) for _, module in linears)
    return {"pruned_weights": float(zeros), "linear_weights": float(total), "sparsity": zeros / max(total, 1)}


def quantize_int8(model: nn.Module) -> nn.Module:
    """int8 dynamic quantization of every Linear (CPU inference), on a deep copy of `model`."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    fp32 = copy.deepcopy(model).cpu().eval()
    convert_conv1d_to_linear(fp32)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not installed); the API still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, DynamicLinear)]


def int8_tensors(quantized: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 model as plain tensors: `<layer>.weight_int8` (out, in) int8, scale, zero_point, bias."""
    tensors: dict[str, torch.Tensor] = {}
    quantized_names = set()
    for name, module in _quantized_linears(quantized):
        weight, bias = module._packed_params._weight_bias()  # type: ignore[operator,union-attr]
        quantized_names.add(name)
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()  # (out, in) int8
        tensors[f"{name}.weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
        tensors[f"{name}.weight_zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    for key, value in quantized.state_dict().items():
        if not isinstance(value, torch.Tensor) or key.rsplit(".", 1)[0] in quantized_names:
            continue
        if any(key.startswith(f"{name}.") for name in quantized_names):
            continue  # packed params / scale buffers of a quantized layer, stored above
        tensors[key] = value.detach().contiguous().clone()
    return tensors


def save_int8_student(quantized: nn.Module, out_dir: Path) -> list[Path]:
    """Write `student_int8.safetensors` + `student_int8.json` (which layers are int8, how to rebuild)."""
    tensors = int8_tensors(quantized)
    layers = [name for name, _ in _quantized_linears(quantized)]
    weights = out_dir / INT8_WEIGHTS
    save_file(tensors, str(weights))
    recipe = {
        "format": "int8-dynamic-per-tensor",
        "int8_linear_layers": layers,
        "rebuild": "build the fp32 student (student_config.json / config.json), then "
        "workers.distill.compress.load_int8_student(model, this directory)",
        "dequantized_weight": "(weight_int8 - weight_zero_point) * weight_scale",
    }
    recipe_path = out_dir / INT8_RECIPE
    recipe_path.write_text(json.dumps(recipe, indent=2))
    return [weights, recipe_path]


def load_int8_student(fp32_skeleton: nn.Module, directory: Path) -> nn.Module:
    """Rebuild the int8 student from its tensors on top of the fp32 architecture (no pickle)."""
    tensors = load_file(str(directory / INT8_WEIGHTS))
    recipe = json.loads((directory / INT8_RECIPE).read_text())
    layers = set(recipe["int8_linear_layers"])
    plain = {k: v for k, v in tensors.items() if not any(k.startswith(f"{n}.") for n in layers)}
    # Everything but the int8 layers goes into the fp32 skeleton first (same names), then it is quantized.
    missing, unexpected = fp32_skeleton.load_state_dict(plain, strict=False)
    unloaded = [k for k in missing if not any(k.startswith(f"{n}.") for n in layers)]
    if unexpected or unloaded:
        raise ValueError(
            f"int8 weights do not fit this model: missing {unloaded[:5]}, unexpected {unexpected[:5]}"
        )
    quantized = quantize_int8(fp32_skeleton)
    for name, module in _quantized_linears(quantized):
        if name not in layers:
            raise ValueError(f"layer {name} is quantized here but not in the saved recipe")
        weight = torch._make_per_tensor_quantized_tensor(
            tensors[f"{name}.weight_int8"],
            float(tensors[f"{name}.weight_scale"]),
            int(tensors[f"{name}.weight_zero_point"]),
        )
        module.set_weight_bias(weight, tensors.get(f"{name}.bias"))  # type: ignore[operator]
    return quantized.eval()


def state_size_mb(model: nn.Module) -> float:
    """Bytes of the model's tensors as stored (int8 layers counted at 1 byte per weight) / 2**20."""
    tensors: list[torch.Tensor]
    if _quantized_linears(model):
        tensors = list(int8_tensors(model).values())
    else:
        tensors = list({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _batches(data: TaskData, batch_size: int) -> Iterator[Batch]:
    for _, batch in iterate_batches(data.test, batch_size, data.collate):
        yield batch


def measure_stage(
    name: str, model: nn.Module, adapter: TaskAdapter, data: TaskData, device: torch.device
) -> dict[str, Any]:
    """Metric on the test split, stored size, nonzero Linear weights and latency at batch 1 and 64."""
    model.to(device).eval()
    metric = adapter.evaluate(model, _batches(data, _EVAL_BATCH), device)
    linears = [m for _, m in prunable_linears(model)]
    nonzero = sum(int((_weight(m) != 0).sum()) for m in linears)
    total = sum(_weight(m).numel() for m in linears)

    latency = {
        f"batch_{size}": measure_latency_ms(adapter, model, adapter.example_batch(data, size), device)
        for size in _LATENCY_BATCHES
    }
    return {
        "stage": name,
        "metric": adapter.metric,
        "value": metric,
        "size_mb": state_size_mb(model),
        "latency_ms": latency,
        "device": str(device),
        "linear_sparsity": (1 - nonzero / total) if total and name != "int8" else None,
    }


def compress_student(
    student: nn.Module,
    adapter: TaskAdapter,
    data: TaskData,
    spec: JobSpec,
    *,
    out_dir: Path,
    device: torch.device,
    callbacks: EngineCallbacks,
) -> dict[str, Any]:
    """Run the spec's compression on the trained student (pruning in place) and measure every stage.

    Returns {"compression_stages": [...]} for the results; the student module itself ends pruned (fp32),
    ready for `save_student`/`export_program`; the int8 copy is written to out_dir.
    """
    config = spec.compression
    if config.prune_amount == 0 and config.quantize == "none":
        return {}
    callbacks.on_event("phase", "compress started", {"phase": "compress"})
    stages = [measure_stage("distilled", student, adapter, data, device)]
    if callbacks.should_stop():
        raise JobStopped("stopped before compression")
    if config.prune_amount > 0:
        student.cpu()
        pruned = global_magnitude_prune(student, config.prune_amount)
        stage = measure_stage("pruned", student, adapter, data, device)
        stage["prune_amount"] = config.prune_amount
        stage["pruned_weights"] = int(pruned["pruned_weights"])
        stages.append(stage)
        callbacks.on_progress(
            # Within this phase (the runner maps it into the job's compress slice): pruning is about half.
            Progress(phase="compress", fraction=0.5, metrics={"sparsity": pruned["sparsity"]})
        )
    if config.quantize == "int8":
        if callbacks.should_stop():
            raise JobStopped("stopped before quantization")
        quantized = quantize_int8(student)
        # Dynamic int8 kernels run on the CPU only; that stage is measured there.
        stages.append(measure_stage("int8", quantized, adapter, data, torch.device("cpu")))
        out_dir.mkdir(parents=True, exist_ok=True)
        save_int8_student(quantized, out_dir)
        student.to(device)
    callbacks.on_event("phase", "compress finished", {"phase": "compress", "stages": stages})
    return {"compression_stages": stages}
