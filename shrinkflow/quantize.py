"""Quantization: global (every supported layer) or local (layers chosen by type or name).

* ``int8-dynamic`` / ``int8-weight-only``: torchao ``quantize_`` on Linear layers. The result
  exports with torch.export and loads without torchao.
* ``int8-static``: post-training static int8 through PT2E (torch.export, torchao's x86 quantizer,
  calibration on real inputs), for Conv and Linear layers.
* ``fp16`` / ``bf16``: half-precision layers behind casts, so the model still takes and returns
  float32 tensors.
* ``int8-dynamic-intmm``: Linear layers as int8 weights (per output channel) times int8
  activations (per token, quantized on the fly) through ``aten._int_mm``, the int8 GEMM torch
  itself ships (VNNI on x86). Unlike torchao's subclasses, which lower to a float matmul on
  dequantized weights, this stays an int8 GEMM in the exported core-ATen program.
* ``int8-dynamic-intx``: torchao's ``Int8DynamicActivationIntxWeightConfig`` (int8 activations
  per token, int8 weights per output channel), the form the ExecuTorch XNNPACK delegate lowers
  to its int8 GEMMs; recipes using it ship with ``runtime="executorch"``.
* ``int4-dynamic-intx``: the same with int4 weights, one scale per group of 32 input columns
  (XNNPACK's qd8 x qb4 GEMM; scales chosen by HQQ), on the layers the spec selects; the model's
  other Linear layers (but those ``keep_float`` names) get ``int8-dynamic-intx``: mixed
  precision in one step. ``runtime="executorch"`` too.
* RNN, GRU and LSTM layers (``layers="rnn"``): ``int8-weight-only``, per row of each weight
  matrix, dequantized on each call into the layer's own recurrence.
* Embedding tables (``layers="embedding"``): ``int8-weight-only`` (per row) and
  ``int4-weight-only`` (groups of 32 per row, two codes a byte). Rows are gathered first and
  only those are dequantized; a gather has no activations to quantize.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from shrinkflow.errors import UnsupportedModelError

if TYPE_CHECKING:  # specs builds its choices from the registries here, so it is imported only for types
    from shrinkflow.specs import QuantSpec

logger = logging.getLogger(__name__)

#: The layer kinds a QuantSpec can name, and the module types each stands for.
LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d),
    "embedding": (nn.Embedding,),
    "rnn": (nn.RNNBase,),  # RNN, GRU, LSTM
}


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: all there is to know about it, in one place. The spec's choices
    (``QuantScheme``, the layers each accepts, the runtime it needs) and the size floor of a
    quantize step are read from :data:`SCHEMES`; adding a scheme is one entry there."""

    name: str
    kinds: frozenset[str]  # the layer kinds of LAYER_TYPES it acts on ("all" = these)
    weight_bits: int  # bits per quantized weight, before scales: the size floor's bound
    apply: Callable  # (model, spec, example_inputs, calibration) -> model
    runtime: str | None = None  # the only runtime that executes its form well; None: any
    at_pack: bool = False  # applied by the runtime's own tools when the program is packed (must be the last step)
    rest_bits: int | None = None  # bits it gives the Linear layers it does not select (and keep_float does not name)

    @property
    def types(self) -> tuple[type[nn.Module], ...]:
        return tuple(t for kind in sorted(self.kinds) for t in LAYER_TYPES[kind])


def torchao_quantization():
    """``torchao.quantization``, imported without its warnings about CUDA-only kernels on a CPU host."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # CUDA-only kernels it cannot load on CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization as tq
    return tq


def selects(spec: QuantSpec, name: str, module: nn.Module) -> bool:
    """Whether layer ``name`` is quantized under ``spec`` (type, include globs, keep_float globs)."""
    types = SCHEMES[spec.scheme].types if spec.layers == "all" else LAYER_TYPES[spec.layers]
    if not isinstance(module, types):
        return False
    if spec.include and not any(fnmatch.fnmatchcase(name, p) for p in spec.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in spec.keep_float)


#: Input columns per int4 weight scale (XNNPACK's qd8 x qb4 GEMM).
INT4_GROUP = 32


def selected_layers(model: nn.Module, spec: QuantSpec) -> list[str]:
    return [name for name, m in model.named_modules() if name and selects(spec, name, m)]


#: Bytes of scales in the size estimate: 1 byte per group of INT4_GROUP 4-bit weights, 4 bytes per
#: row of an 8-bit layer. Against MiniLM's ExecuTorch programs (int4 embeddings, int4 and int8
#: Linear layers side by side) that estimated 14.16 MB for one measured at 14.15 MB and 14.29 MB
#: for one at 13.97 MB; the teacher's torch int8 program, 22.77 MB for 21.43 MB.
ESTIMATE_SCALE_BYTES = {4: 1.0, 8: 4.0}


def estimated_bytes(model: nn.Module, specs: tuple[QuantSpec, ...]) -> int:
    """``model``'s weights after the quantize steps ``specs``, estimated without quantizing: each
    layer a step selects (the first step to select it wins) at its scheme's bits plus scales, the
    layers a scheme's ``rest_bits`` covers at those bits, every other parameter at 4 bytes."""
    bits: dict[str, int] = {}
    for spec in specs:
        scheme = SCHEMES[spec.scheme]
        for name in selected_layers(model, spec):
            bits.setdefault(name, scheme.weight_bits)
        if scheme.rest_bits is not None:
            for name, m in model.named_modules():
                if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in spec.keep_float):
                    bits.setdefault(name, scheme.rest_bits)
    total = 0.0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            b = bits.get(name) if pname == "weight" and p.dim() == 2 else None
            if b is not None and b < 8 and p.shape[-1] % INT4_GROUP:
                b = 8  # ragged rows: the int4 kernels leave the layer at int8
            if b is None or b >= 16:
                total += p.numel() * (4 if b is None else b / 8)
            else:
                per_scale = INT4_GROUP if b < 8 else p.shape[-1]
                total += p.numel() * (b / 8 + ESTIMATE_SCALE_BYTES[4 if b < 8 else 8] / per_scale)
    return int(total)


def _torchao_scheme(config_name: str) -> Callable:
    def apply(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
        model = _swap(model, spec, nn.Embedding, Int8Embedding)  # torchao's configs act on Linear only
        model = _swap(model, spec, nn.RNNBase, Int8RNN)
        if any(isinstance(model.get_submodule(n), nn.Linear) for n in selected_layers(model, spec)):
            tq = torchao_quantization()
            tq.quantize_(model, getattr(tq, config_name)(), filter_fn=lambda m, fqn: selects(spec, fqn, m))
        return model

    return apply


def _swap(model: nn.Module, spec: QuantSpec, kind: type[nn.Module], factory: Callable) -> nn.Module:
    """Replace every selected layer of type ``kind`` by ``factory(layer)``."""
    for name in selected_layers(model, spec):
        layer = model.get_submodule(name)
        if isinstance(layer, kind):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, factory(layer))
    return model


def _symmetric(w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row codes in [-qmax, qmax] (int8) and their fp32 scales. w: (rows, cols)."""
    scale = w.detach().abs().amax(-1).clamp(min=1e-8) / qmax
    return torch.round(w.detach() / scale.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8), scale.float()


class Int8DynamicLinear(nn.Module):
    """y = (q(x) @ Wq^T) * s_x * s_w + b, with int8 x per token and int8 W per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        qweight, scale = _symmetric(linear.weight, 127)
        self.register_buffer("qweight_t", qweight.contiguous().t())  # (in, out), column-major: _int_mm's fast layout
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
        qx, sx = _symmetric(rows, 127)
        y = torch._int_mm(qx, self.qweight_t).float() * sx.unsqueeze(-1) * self.weight_scale  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8RNN(nn.Module):
    """An RNN, GRU or LSTM whose weight matrices are int8 rows with one fp32 scale each.

    The float weights are removed from the wrapped module; each call dequantizes them and runs
    the module's own kernel on them through ``torch.func.functional_call``, so the exported
    program holds int8 weights (about 4x smaller) and runs the same recurrence.
    """

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.names = [n for n, _ in rnn.named_parameters() if n.startswith("weight_")]
        for name in self.names:
            qweight, scale = _symmetric(getattr(rnn, name), 127)
            self.register_buffer(f"{name}_q", qweight)
            self.register_buffer(f"{name}_scale", scale.unsqueeze(-1))
            delattr(rnn, name)
        self.rnn = rnn

    def forward(self, *args: torch.Tensor):
        weights = {n: getattr(self, f"{n}_q").float() * getattr(self, f"{n}_scale") for n in self.names}
        return torch.func.functional_call(self.rnn, weights, args)


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows with one fp32 scale each; only gathered rows are dequantized."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        qweight, scale = _symmetric(emb.weight, 127)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.unsqueeze(-1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.qweight).float() * nn.functional.embedding(ids, self.scale)


class Int4Embedding(nn.Module):
    """An embedding table as 4-bit codes, two a byte, with an fp32 scale per group of ``group`` columns.

    Column ``j`` sits in the low nibble and column ``j + dim/2`` in the high nibble of byte ``j``
    (planar), so unpacking is a concatenation: no reshape of the (batch, length) activations,
    which some delegates (XNNPACK) cannot do with two dynamic dimensions.
    """

    def __init__(self, emb: nn.Embedding, group: int = 32) -> None:
        super().__init__()
        rows, dim = emb.weight.shape
        if dim % group:
            raise UnsupportedModelError(f"Embedding dim {dim} is not a multiple of the int4 group {group}; expected one.")
        q, scale = _symmetric(emb.weight.reshape(rows, dim // group, group), 7)  # codes in [-7, 7]
        codes = (q.reshape(rows, dim) + 8).to(torch.uint8)  # [1, 15]
        half = dim // 2
        self.register_buffer("packed", codes[:, :half] | (codes[:, half:] << 4))  # (rows, dim / 2)
        self.register_buffer("scale", scale)  # (rows, dim / group)
        self.register_buffer("column_group", torch.arange(dim) // group)  # (dim,): the scale of each column

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = nn.functional.embedding(ids, self.packed)  # (..., dim / 2)
        high = torch.div(packed, 16, rounding_mode="floor")  # core-ATen ops only (no shifts): every runtime has them
        codes = torch.cat([packed - high * 16, high], dim=-1)  # (..., dim)
        scale = nn.functional.embedding(ids, self.scale).index_select(-1, self.column_group)  # (..., dim)
        return (codes.float() - 8.0) * scale


def _intmm_scheme(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
    return _swap(model, spec, nn.Linear, Int8DynamicLinear)


def _intx_scheme(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
    tq = torchao_quantization()
    from torchao.quantization.granularity import PerAxis

    config = tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    tq.quantize_(model, config, filter_fn=lambda m, fqn: selects(spec, fqn, m))
    return model


def _intx4_scheme(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
    """int8 activations per token times int4 weights, one scale per group of 32 input columns (the
    qd8 x qb4 GEMM XNNPACK lowers), on the selected layers; every other Linear layer that
    ``keep_float`` does not name gets int8 weights per channel (``int8-dynamic-intx``). One step
    so holds a mixed-precision model: int4 where ``include`` says it costs little, int8 elsewhere."""
    tq = torchao_quantization()
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    # The int4 GEMM takes whole groups of 32 input columns: narrower or ragged layers get int8.
    chosen = [n for n in selected_layers(model, spec) if isinstance(model.get_submodule(n), nn.Linear)]
    int4 = {n for n in chosen if model.get_submodule(n).in_features % INT4_GROUP == 0}
    if len(int4) < len(chosen):
        logger.info("int4-dynamic-intx: %d of %d selected layers take int8 (inputs not whole groups of %d columns): %s",
                    len(chosen) - len(int4), len(chosen), INT4_GROUP, ", ".join(n for n in chosen if n not in int4)[:300])
    # HQQ's scales (still symmetric, so XNNPACK lowers them) beat max-abs ones: MiniLM's mean cosine 0.9863 vs 0.9845.
    int4_config = tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP),
                                                           intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY)
    int8_config = tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    tq.quantize_(model, int4_config, filter_fn=lambda m, fqn: fqn in int4)
    rest = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in int4
            and not any(fnmatch.fnmatchcase(n, p) for p in spec.keep_float)}
    if rest:
        tq.quantize_(model, int8_config, filter_fn=lambda m, fqn: fqn in rest)
    return model


def _int4_scheme(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
    # Tables whose width is not whole groups of INT4_GROUP columns (narrow students') get int8 rows.
    return _swap(model, spec, nn.Embedding,
                 lambda e: Int4Embedding(e, INT4_GROUP) if e.embedding_dim % INT4_GROUP == 0 else Int8Embedding(e))


class Cast(nn.Module):
    """Runs ``inner`` in ``dtype``: floating inputs are cast in, floating outputs cast back to fp32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        args = tuple(a.to(self.dtype) if torch.is_floating_point(a) else a for a in args)
        out = self.inner(*args)
        return out.float() if torch.is_floating_point(out) else out


def _cast_scheme(dtype: torch.dtype) -> Callable:
    def apply(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
        if not spec.is_local:
            return Cast(model, dtype)
        for name in selected_layers(model, spec):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Cast(getattr(parent, child), dtype))
        return model

    return apply


class Program(nn.Module):
    """Holds an exported graph; train()/eval() leave the graph alone (PT2E graphs refuse them)."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.graph_module(*args)

    def train(self, mode: bool = True) -> Program:
        self.training = mode
        return self


def _drop_unused_attrs(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the float originals attached; drop what the graph no longer reads."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _static_int8(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
    from shrinkflow.export import GRAPH_LOCK, export_program

    torchao_quantization()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    calibration = (calibration,) if isinstance(calibration, torch.Tensor) else calibration
    if not calibration or len(calibration[0]) == 0:
        raise UnsupportedModelError("int8-static needs calibration inputs; the workload provided none.")
    quantizer, cfg = xiq.X86InductorQuantizer(), xiq.get_default_x86_inductor_quantization_config()
    if spec.is_local:
        for name in selected_layers(model, spec):
            quantizer.set_module_name_qconfig(name, cfg)
    else:
        quantizer.set_global(cfg)
    with GRAPH_LOCK:
        prepared = prepare_pt2e(export_program(model, example_inputs, lower=False).module(), quantizer)
        with torch.no_grad():
            for start in range(0, len(calibration[0]), 64):
                prepared(*(t[start:start + 64] for t in calibration))
        converted = convert_pt2e(prepared)
        _drop_unused_attrs(converted)
    return Program(converted)


#: ONNX operator types that stand for each layer kind ONNX Runtime's quantizer acts on.
_ORT_OPS = {"linear": ["MatMul", "Gemm"], "conv": ["Conv"], "all": ["Conv", "MatMul", "Gemm"]}


def _ort_static(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
    """int8 QDQ by ONNX Runtime's quantizer, applied when the model is packed for runtime 'onnx'
    (:class:`shrinkflow.ort.OrtQuantized`): per-channel int8 weights, uint8 activations
    calibrated on the workload's calibration inputs. Layers are chosen by kind only."""
    from shrinkflow.ort import OrtQuantized

    if spec.include or spec.keep_float:
        raise UnsupportedModelError(f"Scheme {spec.scheme!r} selects layers by kind only (layers: all, linear or conv); "
                                    f"expected no include/keep_float globs (got {list(spec.include)!r}, {list(spec.keep_float)!r}).")
    calibration = (calibration,) if isinstance(calibration, torch.Tensor) else calibration
    if not calibration or len(calibration[0]) == 0:
        raise UnsupportedModelError(f"{spec.scheme} needs calibration inputs; the workload provided none.")
    return OrtQuantized(model, calibration, _ORT_OPS[spec.layers])


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8-dynamic", frozenset({"linear"}), 8, _torchao_scheme("Int8DynamicActivationInt8WeightConfig")),
    Scheme("int8-weight-only", frozenset({"linear", "embedding", "rnn"}), 8, _torchao_scheme("Int8WeightOnlyConfig")),
    Scheme("int8-static", frozenset({"linear", "conv"}), 8, _static_int8),
    Scheme("fp16", frozenset({"linear", "conv"}), 16, _cast_scheme(torch.float16)),
    Scheme("bf16", frozenset({"linear", "conv"}), 16, _cast_scheme(torch.bfloat16)),
    Scheme("int8-dynamic-intmm", frozenset({"linear"}), 8, _intmm_scheme),
    Scheme("int4-weight-only", frozenset({"embedding"}), 4, _int4_scheme),
    Scheme("int8-dynamic-intx", frozenset({"linear"}), 8, _intx_scheme, runtime="executorch"),
    Scheme("int4-dynamic-intx", frozenset({"linear"}), 4, _intx4_scheme, runtime="executorch", rest_bits=8),
    Scheme("int8-static-ort", frozenset({"linear", "conv"}), 8, _ort_static, runtime="onnx", at_pack=True),
)}


def quantize(model: nn.Module, spec: QuantSpec, example_inputs: tuple[torch.Tensor, ...],
             calibration: torch.Tensor | tuple[torch.Tensor, ...] | None = None) -> nn.Module:
    """A quantized copy of ``model`` (the input model is left as it was). ``calibration``: inputs
    for static schemes' observers, a tensor or one per model input."""
    model = copy.deepcopy(model).eval()
    chosen = selected_layers(model, spec)
    if not chosen:
        msg = (f"QuantSpec(scheme={spec.scheme!r}, layers={spec.layers!r}, include={list(spec.include)!r}, "
               f"keep_float={list(spec.keep_float)!r}) selects no layer of {type(model).__name__!r}; "
               "expected at least one matching Conv/Linear/Embedding layer.")
        raise UnsupportedModelError(msg)
    logger.info("quantizing %d layers to %s", len(chosen), spec.scheme)
    return SCHEMES[spec.scheme].apply(model, spec, example_inputs, calibration).eval()
