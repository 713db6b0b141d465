"""ONNX Runtime as a runtime: the program, its int8 QDQ form, its inputs, its timing reference."""

import lzma

import onnx
import pytest
import torch
from torch import nn

from shrinkflow import artifact, ort, pipeline, steps
from shrinkflow.budget import resolve
from shrinkflow.measure import measure, reference_for, reference_kind
from shrinkflow.quantize import quantize
from shrinkflow.specs import QuantSpec, Recipe

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


def test_an_onnx_program_runs_any_batch_like_the_model_and_states_its_inputs():
    net, x = _cnn(), torch.randn(5, 1, 8, 8)
    packed = artifact.pack(net, (x[:1],), runtime="onnx")
    shipped = artifact.unpack(packed)
    assert packed.format == "onnx" and packed.filename == "model.onnx.xz" and isinstance(shipped, ort.OrtProgram)
    assert torch.allclose(shipped(x), net(x), atol=1e-5)
    assert [o.name for o in onnx.load_model_from_string(lzma.decompress(packed.data)).graph.output] == ["output"]
    assert artifact.input_spec(packed.data, "onnx") == [
        {"name": "input", "dtype": "float32", "shape": [-1, 1, 8, 8], "dynamic": {"0": {"min": 1, "max": None}}}]  # as forward names it
    assert reference_for(shipped).kind == "ort" and reference_kind("onnx") == "ort"


def test_int8_static_ort_ships_a_smaller_qdq_program_close_to_the_float_model():
    net, x = _cnn(), torch.randn(64, 1, 8, 8)
    q = quantize(net, QuantSpec(scheme="int8-static-ort"), (x[:1],), x)
    assert isinstance(q, ort.OrtQuantized) and torch.equal(q(x), net(x))  # in PyTorch: the float model
    fp32, int8 = artifact.pack(net, (x[:1],), runtime="onnx"), artifact.pack(q, (x[:1],), runtime="onnx")
    def ops(packed):
        return [n.op_type for n in onnx.load_model_from_string(lzma.decompress(packed.data)).graph.node]

    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops(int8))  # QDQ
    assert int8.raw_size < 0.6 * fp32.raw_size  # int8 weights; the QDQ nodes and scales cost some bytes on a tiny model
    err = (artifact.unpack(int8)(x) - net(x)).abs().max() / net(x).abs().max()
    assert err < 0.05
    linear_only = artifact.pack(quantize(net, QuantSpec(scheme="int8-static-ort", layers="linear"), (x[:1],), x), (x[:1],),
                                runtime="onnx")
    assert 0 < ops(linear_only).count("DequantizeLinear") < ops(int8).count("DequantizeLinear")  # the convolution stays float


def test_a_two_input_keyword_model_ships_for_onnx_runtime_with_its_input_names(tmp_path):
    from tests.unit import plugin_workload as pw

    bert = pw.bert_pair(seed=0).check()
    profile, limits = resolve("rpi4", None)
    assert "onnx" in profile.runtimes and "onnx" not in resolve("mcu-nrf52840", None)[0].runtimes
    ctx = steps.context(bert, tmp_path, 0)
    recipe = Recipe(name="ort-int8", runtime="onnx", steps=(QuantSpec(scheme="int8-static-ort", layers="linear"),))
    result, packed = pipeline.run_variant(ctx, recipe, profile, limits, None)
    assert result.report is not None and result.report.artifact_format == "onnx", result.skipped
    assert result.report.quality > 0.9
    assert [i["name"] for i in artifact.input_spec(packed.data, "onnx")] == ["input_ids", "attention_mask"]
    ids, mask = bert.example_inputs
    assert torch.allclose(artifact.unpack(packed)(ids, mask), bert.teacher(ids, mask), atol=0.5)


def test_onnx_peak_memory_is_the_runtimes_own_and_grows_with_its_weights_and_activations():
    net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).eval()  # 8.4 MB of fp32 weights
    x = torch.randn(1, 1024)
    shipped = artifact.pack(net, (x,), runtime="onnx").shipped()
    small, large = shipped.peak_bytes((x,), 1), shipped.peak_bytes((torch.randn(4096, 1024),), 1)
    assert small >= 8_000_000  # the session holds the weights
    assert large - small >= 16_000_000  # two 4096 x 1024 fp32 activations (16.8 MB each) live at once at least
    report = measure(net, (x,), packed=artifact.pack(net, (x,), runtime="onnx"), repeats=5)
    assert report.peak_memory_bytes >= 8_000_000 and report.artifact_format == "onnx"
