"""Graph capture: ``torch.export`` of a model with dynamic dimensions, under one process-wide lock.

Every format :mod:`shrinkflow.artifact` ships (torch.export, ExecuTorch, ONNX) starts from a
program captured here; quantization (PT2E) and tracking capture graphs through it too.
"""

from __future__ import annotations

import inspect
import logging
import threading

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: torch.export, tracing and the profiler keep process-global state and are not thread-safe:
#: every graph capture in this process (here, in artifact, pte, ort, quantize, measure, tracking) holds this lock.
GRAPH_LOCK = threading.RLock()
_VOLATILE_META = ("from_node", "stack_trace")


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


#: What the export fallbacks have warned about, once per model kind and process (later ones log at
#: DEBUG): :func:`export_dynamic`'s fixed dimensions, and :func:`shrinkflow.pte.to_pte`'s fixed batch.
FIXED_SAID: set[tuple] = set()


def export_dynamic(model: nn.Module, example_inputs: tuple, dynamic_dims: tuple[int, ...], dim) -> torch.export.ExportedProgram:
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
        logger.log(logging.DEBUG if said in FIXED_SAID else logging.WARNING,  # once per model kind and process
                   "%s does not export with dimensions %s dynamic (%s: %s); exported with the batch dynamic only, inputs "
                   "fixed at %s", type(own).__name__, dynamic_dims, type(exc).__name__, str(exc).splitlines()[0][:200], fixed)
        FIXED_SAID.add(said)
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
        program = export_dynamic(model, example_inputs, dynamic_dims, lambda d: torch.export.Dim.DYNAMIC)
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
