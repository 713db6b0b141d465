import pytest
import torch
from torch import nn

from shrinkflow import artifact
from shrinkflow.errors import UnsupportedModelError
from shrinkflow.measure import tensor_bytes
from shrinkflow.quantize import Cast, quantize, selected_layers
from shrinkflow.specs import QuantSpec


def _bytes(model):
    return sum(tensor_bytes(t) for t in model.state_dict().values())


def _close(a, b, tol):
    return float((a - b).detach().abs().max() / b.detach().abs().max()) < tol


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight-only"])
def test_torchao_int8_quantizes_linear_layers_and_exports(toy, example, scheme):
    q = quantize(toy, QuantSpec(scheme=scheme), example)
    assert type(q.fc1.weight) is not torch.Tensor and type(toy.fc1.weight) in (torch.Tensor, nn.Parameter)
    assert type(q.conv1.weight) in (torch.Tensor, nn.Parameter)  # conv not touched by linear-only schemes
    assert _bytes(q) < 0.5 * _bytes(toy)
    assert _close(q(*example), toy(*example), 0.1)
    packed = artifact.pack(q, example)
    assert packed.format == "torch.export"
    assert _close(artifact.unpack(packed)(*example), q(*example), 1e-4)


def test_static_int8_with_calibration_covers_conv_and_linear(toy, example, toy_data):
    q = quantize(toy, QuantSpec(scheme="int8-static"), example, calibration=toy_data.tensors[0])
    dtypes = {t.dtype for t in q.state_dict().values() if t.numel() > 64}
    assert dtypes == {torch.int8}  # every large weight is int8, none left in fp32
    assert _close(q(*example), toy(*example), 0.15)
    assert artifact.pack(q, example).format == "torch.export"


def test_static_int8_needs_calibration(toy, example):
    with pytest.raises(UnsupportedModelError, match="calibration"):
        quantize(toy, QuantSpec(scheme="int8-static"), example, calibration=None)


def test_local_quantization_keeps_named_layers_float(toy, example, toy_data):
    spec = QuantSpec(scheme="int8-dynamic", keep_float=("fc2",))
    assert selected_layers(toy, spec) == ["fc1"]
    q = quantize(toy, spec, example)
    assert type(q.fc1.weight) is not torch.Tensor
    assert type(q.fc2.weight) in (torch.Tensor, nn.Parameter)


def test_local_static_int8_by_type_and_name(toy, example, toy_data):
    spec = QuantSpec(scheme="int8-static", layers="conv", keep_float=("conv1",))
    assert selected_layers(toy, spec) == ["conv2"]
    q = quantize(toy, spec, example, calibration=toy_data.tensors[0])
    int8 = [t for t in q.state_dict().values() if t.dtype == torch.int8]
    assert [tuple(t.shape) for t in int8] == [tuple(toy.conv2.weight.shape)]


def test_global_and_local_differ(toy, example):
    g = quantize(toy, QuantSpec(scheme="int8-dynamic"), example)
    loc = quantize(toy, QuantSpec(scheme="int8-dynamic", include=("fc2",)), example)
    assert _bytes(loc) > _bytes(g)


@pytest.mark.parametrize(("scheme", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_keeps_fp32_interface(toy, example, scheme, dtype):
    q = quantize(toy, QuantSpec(scheme=scheme), example)
    out = q(*example)
    assert out.dtype == torch.float32
    assert _bytes(q) == pytest.approx(_bytes(toy) / 2, rel=0.01)
    assert _close(out, toy(*example), 0.05)
    assert artifact.unpack(artifact.pack(q, example))(*example).dtype == torch.float32


def test_local_fp16_wraps_only_selected_layers(toy, example):
    q = quantize(toy, QuantSpec(scheme="fp16", include=("fc*",)), example)
    assert isinstance(q.fc1, Cast) and isinstance(q.fc2, Cast) and not isinstance(q.conv1, Cast)
    assert q.conv1.weight.dtype == torch.float32 and q.fc1.inner.weight.dtype == torch.float16


def test_selecting_nothing_is_an_error(toy, example):
    with pytest.raises(UnsupportedModelError, match="selects no layer"):
        quantize(toy, QuantSpec(scheme="int8-dynamic", include=("nope*",)), example)


def test_input_model_is_not_modified(toy, example):
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    quantize(toy, QuantSpec(scheme="int8-dynamic"), example)
    assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight-only", "int8-static"])
def test_shipped_artifact_loads_with_torch_alone(toy, example, toy_data, scheme, tmp_path):
    import subprocess
    import sys

    q = quantize(toy, QuantSpec(scheme=scheme), example, calibration=toy_data.tensors[0])
    path = artifact.save(artifact.pack(q, example), tmp_path)
    torch.save(example[0], tmp_path / "x.pt")
    code = (f"import io, lzma, sys, torch; m = torch.export.load(io.BytesIO(lzma.decompress(open({str(path)!r}, 'rb').read()))).module();"
            f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True); print(m(x).tolist());"
            "print([k for k in ('torchao', 'shrinkflow', 'torch_pruning') if k in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, loaded = proc.stdout.strip().splitlines()[-2:]
    assert loaded == "[]"
    assert torch.allclose(torch.tensor(eval(out)), q(*example), atol=1e-5)


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(16, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x):  # (B, T, 16) -> (B, 5)
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_int8_weight_only_acts_on_gru_and_lstm_and_ships_smaller(cell):
    torch.manual_seed(0)
    model, x = _Recurrent(cell).eval(), torch.randn(4, 5, 16)
    q = quantize(model, QuantSpec(scheme="int8-weight-only", layers="rnn"), (x[:1],))
    assert selected_layers(model, QuantSpec(scheme="int8-weight-only", layers="rnn")) == ["rnn"]
    assert not any(n.startswith("rnn.weight") for n in dict(q.named_parameters()))  # no float weight left behind
    assert (q(x) - model(x)).abs().max() < 0.01
    if cell is nn.LSTM:
        return  # exporting is the same path for both; once is enough for the suite's time
    packed, base = artifact.pack(q, (x[:1],)), artifact.pack(model, (x[:1],))
    assert packed.format == "torch.export" and len(packed.data) < len(base.data) / 2  # shipped (xz) size
    shipped = artifact.loads(packed.data, packed.format)
    assert torch.allclose(shipped(x), q(x), atol=1e-5)


def test_a_recurrent_model_that_fixes_its_length_ships_with_the_batch_dynamic_and_says_so(caplog):
    torch.manual_seed(0)
    model, x = _Recurrent(nn.GRU).eval(), torch.randn(3, 5, 16)
    with caplog.at_level("WARNING", logger="shrinkflow.export"):
        packed = artifact.pack(model, (x[:1],), dynamic_dims=(0, 1))  # the time steps asked to be free too
    assert "exported with the batch dynamic only" in caplog.text and "(1, 5, 16)" in caplog.text
    assert torch.allclose(artifact.loads(packed.data, packed.format)(x), model(x), atol=1e-5)  # any batch
    (spec,) = artifact.input_spec(packed.data, packed.format)
    assert spec["shape"] == [-1, 5, 16] and set(spec["dynamic"]) == {"0"}  # what the manifest tells users


def test_int4_takes_only_layers_of_whole_groups_and_the_rest_get_int8(caplog):
    pytest.importorskip("executorch", reason="the XNNPACK int4 scheme ships for ExecuTorch")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 10)).eval(), torch.randn(4, 6)
    with caplog.at_level("INFO", logger="shrinkflow.quantize"):
        q = quantize(model, QuantSpec(scheme="int4-dynamic-intx"), (x[:1],))
    assert "1 of 2 selected layers take int8" in caplog.text and ": 0" in caplog.text  # layer "0" has 6 inputs
    assert (q(x) - model(x)).abs().max() < 0.1
