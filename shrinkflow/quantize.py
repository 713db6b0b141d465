"""Quantization: global (every supported layer) or local (layers chosen by type or name).

* ``int8-dynamic`` / ``int8-weight-only``: torchao ``quantize_`` on Linear layers. The result
  exports with torch.export and loads without torchao.
* ``int8-static``: post-training static int8 through PT2E (torch.export, torchao's x86 quantizer,
  calibration on real inputs), for Conv and Linear layers.
* ``fp16`` / ``bf16``: half-precision layers behind casts, so the model still takes and returns
  float32 tensors.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from shrinkflow.errors import UnsupportedModelError
from shrinkflow.specs import QuantSpec

logger = logging.getLogger(__name__)

_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d),
}
_SCHEME_TYPES = {
    "int8-dynamic": _TYPES["linear"],
    "int8-weight-only": _TYPES["linear"],
    "int8-static": _TYPES["linear"] + _TYPES["conv"],
    "fp16": _TYPES["linear"] + _TYPES["conv"],
    "bf16": _TYPES["linear"] + _TYPES["conv"],
}


def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # CUDA-only kernels it cannot load on CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization as tq
    return tq


def selects(spec: QuantSpec, name: str, module: nn.Module) -> bool:
    """Whether layer ``name`` is quantized under ``spec`` (type, include globs, keep_float globs)."""
    types = _SCHEME_TYPES[spec.scheme] if spec.layers == "all" else _TYPES[spec.layers]
    if not isinstance(module, types):
        return False
    if spec.include and not any(fnmatch.fnmatchcase(name, p) for p in spec.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in spec.keep_float)


def selected_layers(model: nn.Module, spec: QuantSpec) -> list[str]:
    return [name for name, m in model.named_modules() if name and selects(spec, name, m)]


def _torchao_scheme(config_name: str) -> Callable:
    def apply(model: nn.Module, spec: QuantSpec, example_inputs: tuple, calibration) -> nn.Module:
        tq = _torchao()
        tq.quantize_(model, getattr(tq, config_name)(), filter_fn=lambda m, fqn: selects(spec, fqn, m))
        return model

    return apply


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
    from shrinkflow.artifact import GRAPH_LOCK, export_program

    _torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    if calibration is None or len(calibration) == 0:
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
            for start in range(0, len(calibration), 64):
                prepared(calibration[start:start + 64])
        converted = convert_pt2e(prepared)
        _drop_unused_attrs(converted)
    return Program(converted)


SCHEMES: dict[str, Callable] = {
    "int8-dynamic": _torchao_scheme("Int8DynamicActivationInt8WeightConfig"),
    "int8-weight-only": _torchao_scheme("Int8WeightOnlyConfig"),
    "int8-static": _static_int8,
    "fp16": _cast_scheme(torch.float16),
    "bf16": _cast_scheme(torch.bfloat16),
}


def quantize(model: nn.Module, spec: QuantSpec, example_inputs: tuple[torch.Tensor, ...],
             calibration: torch.Tensor | None = None) -> nn.Module:
    """A quantized copy of ``model`` (the input model is left as it was)."""
    model = copy.deepcopy(model).eval()
    chosen = selected_layers(model, spec)
    if not chosen:
        msg = (f"QuantSpec(scheme={spec.scheme!r}, layers={spec.layers!r}, include={list(spec.include)!r}, "
               f"keep_float={list(spec.keep_float)!r}) selects no layer of {type(model).__name__!r}; "
               "expected at least one matching Conv/Linear layer.")
        raise UnsupportedModelError(msg)
    logger.info("quantizing %d layers to %s", len(chosen), spec.scheme)
    return SCHEMES[spec.scheme](model, spec, example_inputs, calibration).eval()
