"""The deployable artifact: one compressed, self-contained program that plain PyTorch can load.

A model is exported with ``torch.export`` (dynamic batch dimension) when it can be, else traced
to TorchScript, then compressed with xz. Compression is what makes unstructured sparsity and
int8 weights show up in the shipped size (Deep Compression's entropy-coding stage, with a
general-purpose coder). Loading needs only the standard library and torch::

    import io, lzma, torch
    program = torch.export.load(io.BytesIO(lzma.decompress(open("model.pt2.xz", "rb").read())))
    model = program.module()

A recipe with ``runtime="onnx"`` ships an ONNX program (``model.onnx.xz``; int8 QDQ where a
``*-ort`` scheme quantized it), for ONNX Runtime (``pip install onnxruntime``), what Raspberry
Pi and Jetson-class gateways usually run::

    import lzma, onnxruntime as ort
    session = ort.InferenceSession(lzma.decompress(open("model.onnx.xz", "rb").read()))
    out = session.run(None, {"x": x.numpy()})[0]   # inputs by the names forward gives them

A recipe with ``runtime="executorch"`` ships an ExecuTorch program instead (``model.pte.xz``),
lowered to the XNNPACK delegate: the form phones run, with the ExecuTorch runtime in the app.
In Python (``pip install executorch``)::

    from executorch.runtime import Runtime
    data = lzma.decompress(open("model.pte.xz", "rb").read())
    program = Runtime.get().load_program(data)  # reads from data: keep data and program alive
    out = program.load_method("forward").execute([input_ids])[0]
"""

from __future__ import annotations

import gc
import inspect
import io
import json
import logging
import lzma
import re
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shrinkflow.errors import ArtifactError, UnsupportedModelError

logger = logging.getLogger(__name__)

FILENAMES = {"torch.export": "model.pt2.xz", "torchscript": "model.ts.xz", "executorch": "model.pte.xz",
             "onnx": "model.onnx.xz"}
#: The largest batch one call of a .pte program takes: ExecuTorch plans its memory for the
#: largest shapes, so the bound is what a call may allocate. Larger batches are split.
PTE_MAX_BATCH = 16
#: The bound on every other dynamic dimension of a .pte program (a sequence length, say), unless
#: the model itself bounds it lower (a position table of 64 rows: 64).
PTE_MAX_DIM = 512
#: torch.export, tracing and the profiler keep process-global state and are not thread-safe:
#: every graph capture in this process (here, in quantize, in tracking) holds this lock.
GRAPH_LOCK = threading.RLock()
_VOLATILE_META = ("from_node", "stack_trace")
_XZ_PRESET = 6
#: Programs above this size are probed first: float weights hardly compress, and preset 6 runs at
#: about 2 MB/s on them (44 s for MiniLM's 90 MB program) for 2% fewer bytes than preset 0 at 8 MB/s.
_XZ_PROBE_ABOVE = 16 * 2**20
_XZ_PROBE_SLICES, _XZ_PROBE_SLICE = 4, 256 * 2**10
#: Preset 0 is used when it leaves the probe at most this much larger than preset 6 does.
_XZ_FAST_SLACK = 1.03


def xz(raw: bytes) -> bytes:
    """``raw`` compressed with xz: preset 6, or preset 0 for a large program whose sample
    (four evenly spaced 256 kB slices) preset 6 shrinks by under 3% more. Deterministic in ``raw``."""
    if len(raw) > _XZ_PROBE_ABOVE:
        step = len(raw) // _XZ_PROBE_SLICES
        probe = b"".join(raw[i * step:i * step + _XZ_PROBE_SLICE] for i in range(_XZ_PROBE_SLICES))
        if len(lzma.compress(probe, preset=0)) <= _XZ_FAST_SLACK * len(lzma.compress(probe, preset=_XZ_PRESET)):
            return lzma.compress(raw, preset=0)
    return lzma.compress(raw, preset=_XZ_PRESET)


@dataclass(frozen=True)
class Packed:
    """A serialized model: the compressed bytes, their uncompressed size, and the format.

    ``assets`` are the files that ship beside the program (file name -> bytes), e.g. a tokenizer.
    """

    data: bytes
    raw_size: int
    format: str
    assets: dict[str, bytes] = field(default_factory=dict)
    _loaded: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def filename(self) -> str:
        return FILENAMES[self.format]

    def shipped(self) -> nn.Module:
        """The program as it ships, loaded once and kept (measuring and logging a variant both
        use it). :func:`unpack` loads a fresh copy each call."""
        if "model" not in self._loaded:
            self._loaded["model"] = unpack(self)
        return self._loaded["model"]


def _batched(example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # Export with batch 2 so the batch dimension is traced as dynamic, not specialised to 1.
    return tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) else t for t in example_inputs)


def _decompositions() -> dict:
    """Core-ATen decompositions, plus the quantize/dequantize ops PT2E leaves behind.

    Lowering every op to core ATen means the saved program needs nothing but torch to load:
    no torchao custom ops, and no ``quantized_decomposed`` library to import first.
    """
    import torch.ao.quantization.fx._decomposed as qdecomp

    table = torch.export.default_decompositions()
    for name in ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel"):
        packet = getattr(torch.ops.quantized_decomposed, name)
        for overload in packet.overloads():
            fn = getattr(qdecomp, name if overload == "default" else f"{name}_{overload}", None)
            if fn is not None:
                table[getattr(packet, overload)] = fn
    return table


def _aten_only(program: torch.export.ExportedProgram) -> bool:
    """Every operator ``program`` calls is an ATen operator (Python's own, like getitem, count as such)."""
    return all(getattr(node.target, "namespace", "aten") == "aten"
               for node in program.graph.nodes if node.op == "call_function")


def _dynamic_shapes(model: nn.Module, example_inputs: tuple, dims: dict) -> tuple:
    """``torch.export``'s ``dynamic_shapes``: ``dims`` on every tensor input."""
    dyn = tuple(dict(dims) if isinstance(t, torch.Tensor) else None for t in example_inputs)
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        dyn = (dyn,)  # forward(*args): the spec for the packed positional tuple
    return dyn


_FIXED_SAID: set[tuple] = set()


def _export(model: nn.Module, example_inputs: tuple, dynamic_dims: tuple[int, ...], dim) -> torch.export.ExportedProgram:
    """``torch.export`` with ``dim(d)`` on each of ``dynamic_dims``. A model that specialises a
    dimension other than the batch (a GRU unrolled over its time steps, a model that reshapes to
    a fixed length) is exported with the batch dynamic only, the rest fixed at the example's sizes,
    and a warning says so: the program takes those lengths only (the manifest states them)."""
    dyn = _dynamic_shapes(model, example_inputs, {d: dim(d) for d in dynamic_dims})
    try:
        return torch.export.export(model.eval(), _batched(example_inputs), dynamic_shapes=dyn)
    except Exception as exc:  # noqa: BLE001 - export raises many types; retried once below, else re-raised
        if set(dynamic_dims) <= {0}:
            raise
        fixed = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
        own = getattr(model, "model", model)  # a keyword-input model's wrapper: name the model inside
        said = (type(own).__name__, tuple(dynamic_dims), tuple(fixed))
        logger.log(logging.DEBUG if said in _FIXED_SAID else logging.WARNING,  # once per model kind and process
                   "%s does not export with dimensions %s dynamic (%s: %s); exported with the batch dynamic only, inputs "
                   "fixed at %s", type(own).__name__, dynamic_dims, type(exc).__name__, str(exc).splitlines()[0][:200], fixed)
        _FIXED_SAID.add(said)
        dyn = _dynamic_shapes(model, example_inputs, {0: dim(0)})
        return torch.export.export(model.eval(), _batched(example_inputs), dynamic_shapes=dyn)


def export_program(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], lower: bool = True,
                   dynamic_dims: tuple[int, ...] = (0,)) -> torch.export.ExportedProgram:
    """``torch.export`` with ``dynamic_dims`` (default: the batch dimension) dynamic on every tensor
    input (e.g. ``(0, 1)`` for token ids of any length). ``lower``: to core ATen where the program
    calls an operator outside ATen (PT2E's quantize/dequantize, torchao's), so that torch alone
    loads it; a program of ATen operators only loads as it is, and decomposing it would cost more
    than the export itself."""
    with GRAPH_LOCK:
        program = _export(model, example_inputs, dynamic_dims, lambda d: torch.export.Dim.DYNAMIC)
        if not lower:
            return program
        if not _aten_only(program):
            program = program.run_decompositions(_decompositions())
    for node in program.graph.nodes:
        # Provenance holds object addresses and the build machine's file paths: dropping it makes
        # the shipped bytes reproducible (same model -> same sha256) and leaks no local paths.
        for key in _VOLATILE_META:
            node.meta.pop(key, None)
    return program


def pack(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,),
         runtime: str = "torch", max_dims: dict[int, int] | None = None) -> Packed:
    """Serialize ``model`` for deployment on ``runtime`` (a key of :data:`RUNTIMES`)."""
    if runtime not in RUNTIMES:
        raise UnsupportedModelError(f"Unknown runtime {runtime!r}; expected one of {sorted(RUNTIMES)}.")
    return RUNTIMES[runtime](model, example_inputs, dynamic_dims, max_dims)


def pack_torch(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,),
               max_dims: dict[int, int] | None = None) -> Packed:
    """A torch.export program, or TorchScript where export fails, for plain PyTorch."""
    buf = io.BytesIO()
    try:
        torch.export.save(export_program(model, example_inputs, dynamic_dims=dynamic_dims), buf)
        fmt = "torch.export"
    except Exception as export_exc:  # noqa: BLE001 - any export failure means: try TorchScript
        logger.info("torch.export failed (%s); falling back to TorchScript", type(export_exc).__name__)
        buf = io.BytesIO()
        try:
            with torch.no_grad(), GRAPH_LOCK:
                torch.jit.save(torch.jit.trace(model.eval(), example_inputs), buf)
        except Exception as trace_exc:
            msg = (f"Model {type(model).__name__!r} can be neither exported ({export_exc}) nor traced "
                   f"({trace_exc}); expected a model torch.export or torch.jit.trace accepts.")
            raise UnsupportedModelError(msg) from trace_exc
        fmt = "torchscript"
    raw = buf.getvalue()
    return Packed(data=xz(raw), raw_size=len(raw), format=fmt)


def _executorch():
    """The ExecuTorch modules (an optional dependency: the ``minilm`` extra installs it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental API" notices on import
            logging.getLogger("torchao").setLevel(logging.ERROR)
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )
            from executorch.exir import to_edge_transform_and_lower

            # The one private import: the Python MethodMeta of executorch 1.x has no
            # memory_planned_buffer_size() (the C++ MethodMeta has), and the planned activation
            # memory is what peak memory must report for a .pte. Replace it when the binding lands.
            from executorch.exir._serialize._program import deserialize_pte_binary
            from executorch.runtime import Runtime
    except ImportError as exc:
        raise UnsupportedModelError(f"runtime='executorch' needs the executorch package ({exc}); expected it installed "
                                    "(pip install 'shrinkflow[minilm]').") from None
    return XnnpackPartitioner, to_edge_transform_and_lower, deserialize_pte_binary, Runtime


def pack_executorch(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,),
                    max_dims: dict[int, int] | None = None) -> Packed:
    """Export ``model`` and lower it to an ExecuTorch program, the XNNPACK delegate taking every
    subgraph it can (GEMMs, int8 GEMMs, elementwise ops); the rest runs on ExecuTorch's portable
    kernels. ExecuTorch plans memory for the largest shapes: the batch is bounded by
    :data:`PTE_MAX_BATCH`, other dynamic dimensions by ``max_dims`` (dimension -> size), else
    :data:`PTE_MAX_DIM`."""
    partitioner, lower, _, _ = _executorch()
    bounds = {0: PTE_MAX_BATCH, **(max_dims or {})}
    try:
        with GRAPH_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = _export(model, example_inputs, dynamic_dims,
                              lambda d: torch.export.Dim.DYNAMIC(min=1, max=bounds.get(d, PTE_MAX_DIM)))
            raw = bytes(lower(program, partitioner=[partitioner()]).to_executorch().buffer)
        failure = _pte_batch_failure(raw, example_inputs)
        if failure is not None:
            # e.g. a GRU's zero initial state: ExecuTorch plans the `full` op at the traced batch and
            # refuses to resize it, so the program runs only that batch. Ship it static at batch 1
            # instead: PteProgram and the registered model run larger batches one slice at a time.
            own = getattr(model, "model", model)
            logger.log(logging.DEBUG if (type(own).__name__, "pte") in _FIXED_SAID else logging.WARNING,
                       "%s's ExecuTorch program fails at another batch than it was traced with (%s); shipped with "
                       "every dimension fixed at the example's, batch 1", type(own).__name__, failure)
            _FIXED_SAID.add((type(own).__name__, "pte"))
            with GRAPH_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model.eval(), tuple(example_inputs))
                raw = bytes(lower(program, partitioner=[partitioner()]).to_executorch().buffer)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - export and lowering raise many types
        raise UnsupportedModelError(f"Model {type(model).__name__!r} cannot be lowered to ExecuTorch ({type(exc).__name__}: "
                                    f"{str(exc)[:300]}); expected ops XNNPACK or ExecuTorch's portable kernels run "
                                    "(runtime='executorch').") from exc
    return Packed(data=xz(raw), raw_size=len(raw), format="executorch")


def _pte_batch_failure(raw: bytes, example_inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Why the program fails at batch 1 or at its largest batch, or None when it runs both."""
    program = PteProgram(raw)
    for batch in sorted({1, program.max_batch}):
        xs = tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() if isinstance(t, torch.Tensor) else t for t in example_inputs)
        try:
            program(*xs)
        except RuntimeError as exc:
            return f"batch {batch}: {str(exc)[:120]}"
    return None


def input_names(model: nn.Module, n: int) -> list[str]:
    """The names a keyword-input model takes (its :class:`shrinkflow.data.Call`), else its
    ``forward``'s positional parameters (as torch.export names them), else input_0, input_1, ..."""
    from shrinkflow.data import Call

    call = next((m for m in model.modules() if isinstance(m, Call) and m.names), None)
    if call is not None and len(call.names) == n:
        return list(call.names)
    inner = model.model if isinstance(model, Call) else model
    params = [p for p in inspect.signature(inner.forward).parameters.values()
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in params[:n]] if len(params) >= n else [f"input_{i}" for i in range(n)]


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
            quantize_static(str(src), str(dst), Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=self.op_types)
            return dst.read_bytes()


def pack_onnx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,),
              max_dims: dict[int, int] | None = None) -> Packed:
    """An ONNX program for ONNX Runtime: ``torch.export`` (``dynamic_dims`` free), converted by
    ``torch.onnx.export``; an :class:`OrtQuantized` model is then quantized by ONNX Runtime. Inputs
    are named as the model takes them (see :func:`input_names`), the output ``output``."""
    quantized = model if isinstance(model, OrtQuantized) else None
    net = quantized.model if quantized is not None else model
    names = input_names(net, len(example_inputs))
    try:
        with GRAPH_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = _export(net, example_inputs, dynamic_dims, lambda d: torch.export.Dim.DYNAMIC)
            raw = torch.onnx.export(program, input_names=names, output_names=["output"], dynamo=True,
                                    verbose=False).model_proto.SerializeToString()
        if quantized is not None:
            raw = quantized.quantize(raw, names)
    except Exception as exc:  # noqa: BLE001 - export, conversion and quantization raise many types
        raise UnsupportedModelError(f"Model {type(net).__name__!r} cannot be converted to ONNX ({type(exc).__name__}: "
                                    f"{str(exc)[:300]}); expected operators torch.onnx.export converts (runtime='onnx').") from exc
    return Packed(data=xz(raw), raw_size=len(raw), format="onnx")


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


#: The runtimes a variant can ship for, each with the function that packs a model for it: a
#: runtime is added here, once (the spec's ``Runtime`` choices are these keys).
RUNTIMES = {"torch": pack_torch, "executorch": pack_executorch, "onnx": pack_onnx}


#: ExecuTorch's threadpool is process-wide and XNNPACK delegates keep a pointer to it: resizing
#: it while a loaded program lives leaves that program dangling (wrong results, or a crash). So
#: every program in the process runs under this lock, and a resize first drops every loaded
#: method; each reloads from its bytes on its next call.
_PTE_LOCK = threading.Lock()
_PTE_LIVE: weakref.WeakSet = weakref.WeakSet()


def _pte_threads(n: int) -> None:
    """Size ExecuTorch's threadpool to ``n`` (call with ``_PTE_LOCK`` held)."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() == n:
        return
    for program in list(_PTE_LIVE):
        program._unload()
    gc.collect()  # the delegates go before the pool they point to
    portable_lib._unsafe_reset_threadpool(n)


class PteProgram(nn.Module):
    """An ExecuTorch program behind the ``nn.Module`` call: tensors in, tensor out.

    It runs on as many threads as torch is set to (``torch.set_num_threads``); batches larger
    than the program's bound are run in slices. ``program_bytes`` (constants included) and
    ``planned_bytes`` (the memory ExecuTorch plans for activations at the largest shapes) are
    what the program holds while it runs. Calls are serialised process-wide (see ``_PTE_LOCK``).
    """

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        _, _, deserialize, _ = _executorch()
        try:
            plan = deserialize(raw).program.execution_plan[0]
        except Exception as exc:  # noqa: BLE001 - the flatbuffer parser raises many types
            raise ArtifactError(f"Artifact is not a loadable ExecuTorch program ({type(exc).__name__}: {str(exc)[:200]}); "
                                "expected a .pte written by shrinkflow.") from None
        self._raw = raw
        self._program = self._method = None
        with _PTE_LOCK:
            self._load()
            _PTE_LIVE.add(self)
        self.program_bytes = len(raw)
        self.planned_bytes = int(sum(plan.non_const_buffer_sizes))
        self.max_batch = int(self._method.metadata.input_tensor_meta(0).sizes()[0])

    def _load(self) -> None:
        try:
            self._program = _executorch()[3].get().load_program(self._raw)
            self._method = self._program.load_method("forward")
        except Exception as exc:  # noqa: BLE001 - the runtime raises many types
            raise ArtifactError(f"Artifact is not a loadable ExecuTorch program ({type(exc).__name__}: {str(exc)[:200]}); "
                                "expected a .pte written by shrinkflow.") from None

    def _unload(self) -> None:
        self._method = self._program = None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        n = args[0].shape[0]
        if n > self.max_batch:
            return torch.cat([self(*(a[i:i + self.max_batch] for a in args)) for i in range(0, n, self.max_batch)])
        with _PTE_LOCK:
            _pte_threads(torch.get_num_threads())
            if self._method is None:
                self._load()
            out = self._method.execute([a.contiguous() for a in args])
            out = [t.clone() for t in out]  # outputs may live in the program's planned memory
        return out[0] if len(out) == 1 else tuple(out)


def unpack(packed: Packed) -> nn.Module:
    return loads(packed.data, packed.format)


_TEXT_RECORD = re.compile(rb"[0-9A-Za-z._-]{0,64}\n?")


def check_pickle_free(raw: bytes) -> None:
    """Refuse a .pt2 archive holding anything but raw tensors, JSON, short text and tensor-only pickles.

    ``torch.export.load`` unpickles some records without ``weights_only``, so a crafted archive
    could run code when loaded; every record is checked first (raw tensor records by the
    configs that list them, pickles with torch's restricted ``weights_only`` unpickler).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"Artifact is not a torch.export archive ({exc}); expected a .pt2 zip.") from None
    with archive:
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        raw_tensors = set()
        for name in (n for n in names if n.endswith("_config.json")):
            folder = name.rpartition("/")[0]
            for entry in json.loads(archive.read(name)).get("config", {}).values():
                if not entry.get("use_pickle", True):
                    raw_tensors.add(f"{folder}/{entry['path_name']}")
        for name in names:
            data = archive.read(name)
            if name in raw_tensors or _TEXT_RECORD.fullmatch(data) or _is_json(data):
                continue
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any refusal by the restricted unpickler
                raise ArtifactError(f"Record {name!r} of the artifact is not a plain tensor payload ({type(exc).__name__}); "
                                    "expected only tensors and metadata, refusing to load it.") from None


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def loads(data: bytes, fmt: str) -> nn.Module:
    """Load a packed model from its compressed bytes, with plain torch, after checking it is pickle-free."""
    try:
        raw = lzma.decompress(data)
    except lzma.LZMAError as exc:
        raise ArtifactError(f"Artifact is not valid xz data ({exc}); expected a file written by shrinkflow.") from exc
    if fmt == "torch.export":
        check_pickle_free(raw)
        with GRAPH_LOCK:  # the deserializer keeps a module-level global: one load at a time per process
            return torch.export.load(io.BytesIO(raw)).module()
    if fmt == "torchscript":
        return torch.jit.load(io.BytesIO(raw))  # TorchScript archives hold code and tensors, no pickled objects
    if fmt == "executorch":
        return PteProgram(raw)  # a flatbuffer: no pickle, no code
    if fmt == "onnx":
        return OrtProgram(raw)  # a protobuf: no pickle, no code
    raise ArtifactError(f"Unknown artifact format {fmt!r}; expected one of {sorted(FILENAMES)}.")


#: ExecuTorch's scalar type codes (c10's ScalarType numbering) -> dtype names.
_PTE_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
               11: "bool", 15: "bfloat16"}


def _dim(size, ranges: dict) -> int | dict:
    """A static size, or ``{"min", "max"}`` (max None: unbounded) for a symbolic one."""
    if isinstance(size, int):
        return size
    bound = ranges.get(size.node.expr)
    lo = int(bound.lower) if bound is not None else 1
    hi = bound.upper if bound is not None and bound.upper.is_Integer else None  # int_oo: unbounded
    # torch.export reports 2 as the floor of a dimension exported as Dim.DYNAMIC (it specialises 0 and 1
    # while tracing); the program's own input check accepts 1, which is how every variant is measured.
    return {"min": 1 if lo == 2 else lo, "max": int(hi) if hi is not None else None}


def _entry(name: str, dtype: str, dims: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": [d if isinstance(d, int) else -1 for d in dims],
            "dynamic": {str(i): d for i, d in enumerate(dims) if not isinstance(d, int)}}


def input_spec(data: bytes, fmt: str, example_inputs: tuple[torch.Tensor, ...] = (),
               dynamic_dims: tuple[int, ...] = (0,), names: tuple[str, ...] | None = None) -> list[dict]:
    """The program's inputs as a user must feed them: name, dtype, shape (-1 where dynamic) and,
    per dynamic dimension, its bounds (``{"0": {"min": 1, "max": None}}``; None: unbounded).

    torch.export programs state all of it (``graph_signature.user_inputs``, the placeholders'
    shapes, ``range_constraints``); an ExecuTorch program states dtypes and its largest shapes
    (``dynamic_dims`` says which are dynamic, from 1 up to that size); for TorchScript the names
    come from the graph and the rest from ``example_inputs``. ``names``, when given (one per
    input), replace the program's own where inputs are taken in order (not ONNX's, fed by name).
    """
    spec = _input_spec(lzma.decompress(data), fmt, example_inputs, dynamic_dims)
    if names and len(names) == len(spec) and fmt != "onnx":  # ONNX Runtime feeds inputs by the program's own names
        spec = [dict(entry, name=name) for entry, name in zip(spec, names, strict=True)]
    return spec


def _input_spec(raw: bytes, fmt: str, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...]) -> list[dict]:
    if fmt == "torch.export":
        check_pickle_free(raw)
        with GRAPH_LOCK:
            program = torch.export.load(io.BytesIO(raw))
        vals = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
        return [_entry(name, str(vals[name].dtype).removeprefix("torch."),
                       [_dim(s, program.range_constraints) for s in vals[name].shape])
                for name in program.graph_signature.user_inputs if name in vals]
    if fmt == "executorch":
        meta = PteProgram(raw)._method.metadata
        out = []
        for i in range(meta.num_inputs()):
            t = meta.input_tensor_meta(i)
            dims = [{"min": 1, "max": int(n)} if d in dynamic_dims else int(n) for d, n in enumerate(t.sizes())]
            out.append(_entry(f"input_{i}", _PTE_DTYPES.get(t.dtype(), str(t.dtype())), dims))
        return out
    if fmt == "onnx":
        return _onnx_inputs(raw)
    names = [v.debugName() for v in list(torch.jit.load(io.BytesIO(raw)).graph.inputs())[1:]]
    return [_entry(names[i] if i < len(names) else f"input_{i}", str(t.dtype).removeprefix("torch."),
                   [{"min": 1, "max": None} if d in dynamic_dims else int(n) for d, n in enumerate(t.shape)])
            for i, t in enumerate(example_inputs)]


def _onnx_inputs(raw: bytes) -> list[dict]:
    """An ONNX program's inputs: a named (symbolic) dimension is dynamic, unbounded."""
    import onnx

    types = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}
    out = []
    for value in onnx.load_model_from_string(raw).graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else {"min": 1, "max": None} for d in tensor.shape.dim]
        out.append(_entry(value.name, {"float": "float32", "double": "float64"}.get(types[tensor.elem_type], types[tensor.elem_type]), dims))
    return out


def describe_inputs(spec: list[dict]) -> str:
    """``x: float32 (N, 1, 8, 8), N from 1 to unbounded`` for each input, ``; ``-separated (N: the
    batch, L: the second dimension, when dynamic)."""
    parts = []
    for entry in spec:
        dims = [str(n) if n != -1 else None for n in entry["shape"]]
        bounds = []
        for d, bound in entry["dynamic"].items():
            letter = {"0": "N", "1": "L"}.get(d, f"D{d}")
            dims[int(d)] = letter
            bounds.append(f"{letter} from {bound['min']} to {bound['max'] if bound['max'] is not None else 'unbounded'}")
        parts.append(f"{entry['name']}: {entry['dtype']} ({', '.join(dims)})" + (f", {', '.join(bounds)}" if bounds else ""))
    return "; ".join(parts)


def example_code(spec: list[dict]) -> str:
    """Python that builds one example input per entry (batch 1, other dynamic dims 8 within their bounds)."""
    out = []
    for entry in spec:
        dims = []
        for d, n in enumerate(entry["shape"]):
            bound = entry["dynamic"].get(str(d))
            want = 1 if d == 0 else 8
            dims.append(str(n) if bound is None else str(max(bound["min"], min(want, bound["max"] or want))))
        shape = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
        dtype = entry["dtype"]
        make = f"torch.randn({shape}, dtype=torch.{dtype})" if dtype.startswith(("float", "bfloat")) else \
            f"torch.ones({shape}, dtype=torch.{dtype})"
        out.append(f"{entry['name']} = {make}")
    return "; ".join(out)


def save(packed: Packed, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / packed.filename
    path.write_bytes(packed.data)
    return path


def load(path: Path) -> nn.Module:
    """Load ``model.pt2.xz``, ``model.ts.xz`` or ``model.pte.xz`` written by :func:`save`."""
    fmt = {v: k for k, v in FILENAMES.items()}.get(Path(path).name)
    if fmt is None:
        raise ArtifactError(f"Unknown artifact file name {Path(path).name!r}; expected one of {sorted(FILENAMES.values())}.")
    return loads(Path(path).read_bytes(), fmt)
