"""A shipped program states its inputs, and the printed load snippet runs as printed."""

from __future__ import annotations

import pytest
import torch

from shrinkflow import artifact, pte
from shrinkflow.specs import Budget, SweepSpec


def _run_snippet(code: str, folder, monkeypatch, capsys) -> str:
    monkeypatch.chdir(folder)
    exec(compile(code, "<snippet>", "exec"), {})  # noqa: S102 - the line `pull` prints, run in the pulled folder
    return capsys.readouterr().out.strip()


def test_torch_export_program_states_its_inputs_with_dynamic_bounds(toy, example, tmp_path, monkeypatch, capsys):
    from tasks.describe import load_snippet

    packed = artifact.pack(toy, example)
    spec = artifact.input_spec(packed.data, packed.format)
    assert spec == [{"name": "x", "dtype": "float32", "shape": [-1, 1, 8, 8], "dynamic": {"0": {"min": 1, "max": None}}}]
    assert artifact.describe_inputs(spec) == "x: float32 (N, 1, 8, 8), N from 1 to unbounded"
    artifact.save(packed, tmp_path)
    snippet = load_snippet(packed.format, spec)
    assert "x = torch.randn((1, 1, 8, 8), dtype=torch.float32)" in snippet and "model(x)" in snippet
    assert _run_snippet(snippet, tmp_path, monkeypatch, capsys) == "torch.Size([1, 4])"


def test_executorch_snippet_says_its_runtime_and_defines_its_inputs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")
    from tasks.describe import LOADERS, load_snippet
    from tests.unit.test_executorch import TokenEncoder, ids

    torch.manual_seed(0)
    packed = artifact.pack(TokenEncoder().eval(), (ids(1, 6),), (0, 1), "executorch")
    spec = artifact.input_spec(packed.data, packed.format, (ids(1, 6),), (0, 1))
    assert spec[0]["dtype"] == "int64" and spec[0]["shape"] == [-1, -1]
    assert spec[0]["dynamic"] == {"0": {"min": 1, "max": pte.PTE_MAX_BATCH}, "1": {"min": 1, "max": pte.PTE_MAX_DIM}}
    artifact.save(packed, tmp_path)
    snippet = load_snippet(packed.format, spec)
    assert "executorch.runtime" in snippet and "ExecuTorch runtime" in LOADERS["executorch"]
    assert _run_snippet(snippet, tmp_path, monkeypatch, capsys) == "torch.Size([1, 32])"


def test_onnx_snippet_feeds_each_input_by_name_and_runs_as_printed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from tasks.describe import LOADERS, load_snippet

    class Pair(torch.nn.Module):  # two inputs of different dtypes
        def forward(self, x, scale):
            return x * scale.float().unsqueeze(-1)

    example = (torch.randn(1, 3), torch.ones(1, dtype=torch.int64))
    packed = artifact.pack(Pair(), example, runtime="onnx")
    spec = artifact.input_spec(packed.data, packed.format)
    assert [(i["name"], i["dtype"], i["shape"]) for i in spec] == [("x", "float32", [-1, 3]), ("scale", "int64", [-1])]
    artifact.save(packed, tmp_path)
    snippet = load_snippet(packed.format, spec)
    assert "onnxruntime" in snippet and "ONNX Runtime" in LOADERS["onnx"]
    assert "{'x': x.numpy(), 'scale': scale.numpy()}" in snippet  # the names forward gives them
    assert _run_snippet(snippet, tmp_path, monkeypatch, capsys) == "torch.Size([1, 3])"
    from tasks.describe import version_description

    text = version_description("ort", SweepSpec(device="rpi4"), Budget(), {}, spec[:1], "onnx", "m", "1")
    assert "mlflow.pyfunc.load_model('models:/m/1')" in text and ".values()" in text and "model.onnx.xz" in text


def test_version_tags_are_readable_and_give_the_spec_back():
    from tasks.describe import (
        budget_text,
        metrics_text,
        spec_from_tags,
        spec_tags,
        version_description,
    )

    spec = SweepSpec(name="s1", budget=Budget(max_size_mb=0.4, max_latency_ms=5), seed=3, quality_tolerance=0.01)
    tags = spec_tags(spec)
    assert tags["spec.budget.max_size_mb"] == "0.4" and not any(v == "None" for v in tags.values())
    assert spec_from_tags({**tags, "variant": "kd"}) == spec
    assert spec_from_tags({"variant": "kd"}) is None
    limits = Budget(max_size_mb=0.4, max_latency_ms=5, max_quality_drop=0.01)
    assert budget_text(limits) == "size <= 0.4 MB, p50 latency <= 5 ms, quality drop vs teacher <= 0.01, 1 thread"
    metrics = {"quality": 0.96667, "size_bytes": 34552.0, "latency_p50_ms": 0.6, "peak_memory_bytes": 2.5e6}
    assert metrics_text(metrics) == "quality 0.9667, size 34.6 kB, p50 0.600 ms, peak memory 2.50 MB"
    inputs = [{"name": "x", "dtype": "float32", "shape": [-1, 1, 8, 8], "dynamic": {"0": {"min": 1, "max": None}}}]
    text = version_description("kd", spec, limits, metrics, inputs, "torch.export", "digits-mcu", "4")
    assert "**Budget:** size <= 0.4 MB" in text and "x: float32 (N, 1, 8, 8)" in text
    assert "mlflow.pytorch.load_model('models:/digits-mcu/4')" in text and "torch.randn((1, 1, 8, 8)" in text
