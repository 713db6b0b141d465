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

import io
import json
import logging
import lzma
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shrinkflow.errors import ArtifactError, UnsupportedModelError
from shrinkflow.export import GRAPH_LOCK, export_program
from shrinkflow.ort import OrtProgram, to_onnx
from shrinkflow.pte import PTE_MAX_BATCH as PTE_MAX_BATCH  # re-exported: bench/ reads artifact.PTE_MAX_BATCH
from shrinkflow.pte import PteProgram, to_pte

logger = logging.getLogger(__name__)

FILENAMES = {"torch.export": "model.pt2.xz", "torchscript": "model.ts.xz", "executorch": "model.pte.xz",
             "onnx": "model.onnx.xz"}
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


def pack_executorch(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,),
                    max_dims: dict[int, int] | None = None) -> Packed:
    """Export ``model`` and lower it to an ExecuTorch program, the XNNPACK delegate taking every
    subgraph it can (GEMMs, int8 GEMMs, elementwise ops); the rest runs on ExecuTorch's portable
    kernels. ExecuTorch plans memory for the largest shapes: the batch is bounded by
    :data:`~shrinkflow.pte.PTE_MAX_BATCH`, other dynamic dimensions by ``max_dims`` (dimension ->
    size), else :data:`~shrinkflow.pte.PTE_MAX_DIM`. The lowering is :func:`shrinkflow.pte.to_pte`."""
    raw = to_pte(model, example_inputs, dynamic_dims, max_dims)
    return Packed(data=xz(raw), raw_size=len(raw), format="executorch")


def pack_onnx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,),
              max_dims: dict[int, int] | None = None) -> Packed:
    """An ONNX program for ONNX Runtime: ``torch.export`` (``dynamic_dims`` free), converted by
    ``torch.onnx.export``; an :class:`~shrinkflow.ort.OrtQuantized` model is then quantized by ONNX
    Runtime. Inputs are named as the model takes them (see :func:`~shrinkflow.export.input_names`),
    the output ``output``. The conversion is :func:`shrinkflow.ort.to_onnx`."""
    raw = to_onnx(model, example_inputs, dynamic_dims)
    return Packed(data=xz(raw), raw_size=len(raw), format="onnx")


#: The runtimes a variant can ship for, each with the function that packs a model for it: a
#: runtime is added here, once (the spec's ``Runtime`` choices are these keys).
RUNTIMES = {"torch": pack_torch, "executorch": pack_executorch, "onnx": pack_onnx}


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
        meta = PteProgram(raw).metadata
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
