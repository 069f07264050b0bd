"""Post-training compression: global magnitude pruning, int8 dynamic quantization, stages re-measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from app.schemas.job_spec import JobSpec
from workers.distill.compress import (
    INT8_WEIGHTS,
    compress_student,
    global_magnitude_prune,
    load_int8_student,
    quantize_int8,
    save_int8_student,
    state_size_mb,
)
from workers.distill.contract import NullCallbacks
from workers.distill.kernel import TaskData, iterate_batches
from workers.distill.registry import get_adapter
from workers.distill.tasks.classification.data import load_digits_data
from workers.distill.tasks.classification.models import MLP

torch.set_num_threads(2)


def _digits_spec(prune: float, quantize: str) -> JobSpec:
    return JobSpec.model_validate(
        {"teacher_model_name": "digits-cnn", "compression": {"prune_amount": prune, "quantize": quantize}}
    )


def _trained_mlp() -> tuple[nn.Module, TaskData]:
    torch.manual_seed(0)
    data = load_digits_data()
    model = MLP(64, 10, [64])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        for _, batch in iterate_batches(data.train, 64, None, generator=torch.Generator().manual_seed(0)):
            loss = nn.functional.cross_entropy(model(batch["inputs"]), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), data


def test_global_pruning_reaches_the_amount_and_is_permanent() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30), nn.Linear(30, 5))
    stats = global_magnitude_prune(model, 0.6)
    assert stats["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert not any(
        name.endswith("_orig") for name, _ in model.named_parameters()
    )  # reparametrisation removed
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    # Global, not per layer: layers end with different sparsity.
    per_layer = [float((m.weight == 0).float().mean()) for m in model if isinstance(m, nn.Linear)]
    assert max(per_layer) - min(per_layer) > 0.01


def test_gpt2_pruning_keeps_conv1d_layout_and_tied_head(tmp_path: Path) -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    global_magnitude_prune(model, 0.5)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied head left dense and tied
    assert float((model.transformer.h[0].attn.c_attn.weight == 0).float().mean()) > 0.2
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, reloaded(ids).logits, atol=1e-6)
    quantized = quantize_int8(model)
    save_int8_student(quantized, tmp_path)
    rebuilt = load_int8_student(GPT2LMHeadModel.from_pretrained(tmp_path), tmp_path)
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, rebuilt(ids).logits)


def test_int8_student_reloads_from_plain_tensors_with_identical_outputs(tmp_path: Path) -> None:
    model, _ = _trained_mlp()
    quantized = quantize_int8(model)
    paths = save_int8_student(quantized, tmp_path)
    dtypes = {t.dtype for t in load_file(str(tmp_path / INT8_WEIGHTS)).values()}  # plain tensors, no pickle
    assert torch.int8 in dtypes
    rebuilt = load_int8_student(MLP(64, 10, [64]), tmp_path)
    x = torch.rand(7, 64)
    with torch.no_grad():
        assert torch.equal(quantized(x), rebuilt(x))
        assert torch.allclose(quantized(x), model(x), rtol=0.05, atol=0.5)
    assert state_size_mb(quantized) < state_size_mb(model) / 3
    assert all(p.is_file() for p in paths)


def test_compress_student_measures_every_stage_for_a_digits_student(tmp_path: Path) -> None:
    model, data = _trained_mlp()
    adapter = get_adapter("classification")
    extra = compress_student(
        model,
        adapter,
        data,
        _digits_spec(0.5, "int8"),
        out_dir=tmp_path,
        device=torch.device("cpu"),
        callbacks=NullCallbacks(),
    )
    stages = extra["compression_stages"]
    assert [s["stage"] for s in stages] == ["distilled", "pruned", "int8"]
    distilled, pruned, int8 = stages
    assert distilled["value"] > 0.9 and pruned["value"] > 0.85 and int8["value"] > 0.85
    assert pruned["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert int8["size_mb"] < distilled["size_mb"] / 3
    assert all(s["latency_ms"]["batch_1"] > 0 and s["latency_ms"]["batch_64"] > 0 for s in stages)
    # The student module itself is left pruned (what student.pt2 exports), still fp32.
    assert float((model.layers[0].weight == 0).float().mean()) > 0.3
    assert (tmp_path / INT8_WEIGHTS).is_file()


def test_default_compression_does_nothing(tmp_path: Path) -> None:
    model, data = _trained_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = compress_student(
        model,
        get_adapter("classification"),
        data,
        _digits_spec(0.0, "none"),
        out_dir=tmp_path,
        device=torch.device("cpu"),
        callbacks=NullCallbacks(),
    )
    assert extra == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(tmp_path.iterdir())
