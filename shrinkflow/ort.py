"""ONNX programs for ONNX Runtime: converting a model (int8 QDQ where ONNX Runtime quantizes it), and running one.

:func:`to_onnx` gives the program's bytes (:func:`shrinkflow.artifact.pack_onnx` ships them
compressed); :class:`OrtProgram` runs a program behind the ``nn.Module`` call, the form
:func:`shrinkflow.artifact.loads` returns for an ``.onnx``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from shrinkflow.errors import ArtifactError, UnsupportedModelError
from shrinkflow.export import GRAPH_LOCK, export_dynamic, input_names

#: Calibration rows ONNX Runtime's quantizer observes (at most), and the rows per calibration call.
ORT_CALIBRATION, ORT_BATCH = 256, 32


class OrtQuantized(nn.Module):
    """A model to ship as an ONNX program quantized by ONNX Runtime (int8 QDQ, per-channel weights,
    activations calibrated on ``calibration``, one tensor per input), on the ``op_types`` given
    (None: every op type ONNX Runtime quantizes). In PyTorch it runs as the float model. The
    first ``ORT_CALIBRATION`` rows of ``calibration`` calibrate, in batches of ``ORT_BATCH``."""

    def __init__(self, model: nn.Module, calibration: tuple[torch.Tensor, ...], op_types: list[str] | None = None):
        super().__init__()
        self.model, self.calibration, self.op_types = model, calibration, op_types

    def forward(self, *inputs: torch.Tensor):
        return self.model(*inputs)

    def quantize(self, raw: bytes, names: list[str]) -> bytes:
        import tempfile

        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Feeds(CalibrationDataReader):
            def __init__(self, feeds: list[dict]):
                self.feeds = iter(feeds)

            def get_next(self):
                return next(self.feeds, None)

        n = min(len(self.calibration[0]), ORT_CALIBRATION)
        feeds = [{name: t[i:min(i + ORT_BATCH, n)].numpy() for name, t in zip(names, self.calibration, strict=True)}
                 for i in range(0, n, ORT_BATCH)]
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(raw)
            # reduce_range: 7-bit weights. ONNX Runtime's u8s8 kernels on x86-64 without VNNI (AVX2 only) can
            # saturate with 8-bit weights; on an AVX2-only AMD EPYC the CNN's error was 0.16 of its range, 0.05 allowed.
            quantize_static(str(src), str(dst), Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=self.op_types)
            return dst.read_bytes()


def to_onnx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,)) -> bytes:
    """An ONNX program (its bytes) for ONNX Runtime: ``torch.export`` (``dynamic_dims`` free),
    converted by ``torch.onnx.export``; an :class:`OrtQuantized` model is then quantized by ONNX
    Runtime. Inputs are named as the model takes them (see :func:`shrinkflow.export.input_names`),
    the output ``output``."""
    quantized = model if isinstance(model, OrtQuantized) else None
    net = quantized.model if quantized is not None else model
    names = input_names(net, len(example_inputs))
    try:
        with GRAPH_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = export_dynamic(net, example_inputs, dynamic_dims, lambda d: torch.export.Dim.DYNAMIC)
            raw = torch.onnx.export(program, input_names=names, output_names=["output"], dynamo=True,
                                    verbose=False).model_proto.SerializeToString()
        if quantized is not None:
            raw = quantized.quantize(raw, names)
    except Exception as exc:  # noqa: BLE001 - export, conversion and quantization raise many types
        raise UnsupportedModelError(f"Model {type(net).__name__!r} cannot be converted to ONNX ({type(exc).__name__}: "
                                    f"{str(exc)[:300]}); expected operators torch.onnx.export converts (runtime='onnx').") from exc
    return raw


class OrtProgram(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call: tensors in (by the program's input
    order), tensor out, on as many threads as torch is set to (``torch.set_num_threads``)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw, self._threads, self._session, self._lock = raw, None, None, threading.Lock()
        self.program_bytes = len(raw)
        self.names = [i.name for i in self._session_for(torch.get_num_threads()).get_inputs()]

    def _session_for(self, n: int):
        import onnxruntime as ort

        with self._lock:
            return self._session if self._threads == n else self._new_session(ort, n)

    def _new_session(self, ort, n: int):
        """A session on ``n`` threads (call with the lock held). A caller already running on the
        one it replaces keeps it: ``InferenceSession.run`` may be called from several threads."""
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = n, 1
        options.log_severity_level = 3  # errors only: no per-session notices on stderr
        try:
            self._session = ort.InferenceSession(self._raw, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - the runtime raises its own types
            raise ArtifactError(f"Artifact is not a loadable ONNX program ({type(exc).__name__}: {str(exc)[:200]}); "
                                "expected a .onnx written by shrinkflow.") from None
        self._threads = n
        return self._session

    def peak_bytes(self, example_inputs: tuple[torch.Tensor, ...], threads: int) -> int | None:
        """ONNX Runtime's own peak memory for this program on ``example_inputs``: the session's
        weights, arena and activations, as the growth of a fresh process's peak resident set
        (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` once the runtime is imported)
        while it creates the session and runs it twice, after its one-time start-up was paid on a
        trivial graph (what every program pays once per process is not this program's). ONNX
        Runtime's Python API exposes no allocator statistics; a fresh process keeps memory freed
        earlier from hiding the growth. None where the kernel offers no such counter (not Linux)."""
        if not Path("/proc/self/clear_refs").exists():
            return None
        with tempfile.TemporaryDirectory() as tmp:
            program, feeds = Path(tmp) / "model.onnx", Path(tmp) / "feeds.pt"
            program.write_bytes(self._raw)
            torch.save({name: a.detach().cpu().contiguous() for name, a in zip(self.names, example_inputs, strict=True)}, feeds)
            proc = subprocess.run([sys.executable, "-c", _ORT_PEAK, str(program), str(feeds), str(threads)],
                                  capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not proc.stdout.strip().isdigit():
            raise ArtifactError(f"Measuring the ONNX program's peak memory failed (exit {proc.returncode}: "
                                f"{proc.stderr.strip()[-300:]}); expected a program that runs on its example inputs.")
        return int(proc.stdout.strip())

    def forward(self, *args: torch.Tensor):
        feeds = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.names, args, strict=True)}
        out = [torch.from_numpy(o) for o in self._session_for(torch.get_num_threads()).run(None, feeds)]
        return out[0] if len(out) == 1 else tuple(out)


#: Run by :meth:`OrtProgram.peak_bytes` in a fresh process: argv = program, feeds (torch.save of
#: name -> tensor), threads; prints the growth of the peak resident set in bytes.
_ORT_PEAK = """
import sys
import onnxruntime as ort
import torch

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

raw = open(sys.argv[1], "rb").read()
feeds = {name: t.numpy() for name, t in torch.load(sys.argv[2], weights_only=True).items()}
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = int(sys.argv[3]), 1, 3
try:  # ONNX Runtime's one-time start-up (environment, allocators, kernel registry) is paid on a trivial graph first
    import numpy as np
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm", [x], [y])
    warm = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    warm.ir_version = 8
    ort.InferenceSession(warm.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros(1, dtype=np.float32)})
except ImportError:
    pass
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident set is reset to the current one
base = status("VmRSS:")
session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
for _ in range(2):
    session.run(None, feeds)
print(max(0, status("VmHWM:") - base))
"""
