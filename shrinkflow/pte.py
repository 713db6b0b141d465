"""ExecuTorch programs (``.pte``): lowering a model to the XNNPACK delegate, and running one.

:func:`to_pte` gives the program's bytes (:func:`shrinkflow.artifact.pack_executorch` ships them
compressed); :class:`PteProgram` runs a program behind the ``nn.Module`` call, the form
:func:`shrinkflow.artifact.loads` returns for a ``.pte``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import re
import sys
import threading
import warnings
import weakref

import torch
from torch import nn

from shrinkflow.errors import ArtifactError, UnsupportedModelError
from shrinkflow.export import FIXED_SAID, GRAPH_LOCK, export_dynamic

logger = logging.getLogger(__name__)

#: The largest batch one call of a .pte program takes: ExecuTorch plans its memory for the
#: largest shapes, so the bound is what a call may allocate. Larger batches are split.
PTE_MAX_BATCH = 16
#: The bound on every other dynamic dimension of a .pte program (a sequence length, say), unless
#: the model itself bounds it lower (a position table of 64 rows: 64).
PTE_MAX_DIM = 512


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


def to_pte(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_dims: tuple[int, ...] = (0,),
           max_dims: dict[int, int] | None = None) -> bytes:
    """Export ``model`` and lower it to an ExecuTorch program (its bytes), the XNNPACK delegate taking every
    subgraph it can (GEMMs, int8 GEMMs, elementwise ops); the rest runs on ExecuTorch's portable
    kernels. ExecuTorch plans memory for the largest shapes: the batch is bounded by
    :data:`PTE_MAX_BATCH`, other dynamic dimensions by ``max_dims`` (dimension -> size), else
    :data:`PTE_MAX_DIM`."""
    partitioner, lower, _, _ = _executorch()
    bounds = {0: PTE_MAX_BATCH, **(max_dims or {})}
    own = getattr(model, "model", model)
    # A recurrent layer's zero initial state: ExecuTorch plans the `full` op at the traced batch and
    # refuses to resize it, so the program runs only that batch. Lowering an unrolled GRU takes about a
    # minute on one core: recurrent models go static at once rather than lowered twice.
    failure = "a recurrent layer's initial state" if any(isinstance(m, nn.RNNBase) for m in model.modules()) else None
    try:
        if failure is None:
            with GRAPH_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = export_dynamic(model, example_inputs, dynamic_dims,
                                          lambda d: torch.export.Dim.DYNAMIC(min=1, max=bounds.get(d, PTE_MAX_DIM)))
                raw = bytes(lower(program, partitioner=[partitioner()]).to_executorch().buffer)
            failure = _pte_batch_failure(raw, example_inputs)
        if failure is not None:
            # Ship it static at batch 1 instead: PteProgram and the registered model run larger
            # batches one slice at a time.
            logger.log(logging.DEBUG if (type(own).__name__, "pte") in FIXED_SAID else logging.WARNING,
                       "%s's ExecuTorch program runs only the batch it was traced with (%s); shipped with "
                       "every dimension fixed at the example's, batch 1", type(own).__name__, failure)
            FIXED_SAID.add((type(own).__name__, "pte"))
            with GRAPH_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                one = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in example_inputs)
                program = torch.export.export(model.eval(), one)
                raw = bytes(lower(program, partitioner=[partitioner()]).to_executorch().buffer)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - export and lowering raise many types
        raise UnsupportedModelError(f"Model {type(model).__name__!r} cannot be lowered to ExecuTorch ({type(exc).__name__}: "
                                    f"{str(exc)[:300]}); expected ops XNNPACK or ExecuTorch's portable kernels run "
                                    "(runtime='executorch').") from exc
    return raw


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


#: ExecuTorch's threadpool is process-wide and XNNPACK delegates keep a pointer to it: resizing
#: it while a loaded program lives leaves that program dangling (wrong results, or a crash). So
#: every program in the process runs under this lock, and a resize first drops every loaded
#: method; each reloads from its bytes on its next call.
_PTE_LOCK = threading.Lock()
_PTE_LIVE: weakref.WeakSet = weakref.WeakSet()


#: A line ExecuTorch's runtime logs itself: ``[cpuinfo_utils.cpp:71] Reading file ...``.
_RUNTIME_LINE = re.compile(r"^\[[\w.]+:\d+\] ")


@contextlib.contextmanager
def _runtime_log():
    """ExecuTorch's runtime prints its Info logs (probing the CPU on its first XNNPACK program,
    resizing its threadpool) to Python's ``sys.stderr``, a fragment at a time: in a live terminal
    display each fragment lands on a line of its own. They go to this module's debug log (``-v``)
    instead. Used with ``_PTE_LOCK`` held, around a load or a threadpool reset (milliseconds); any
    other text written to ``sys.stderr`` meanwhile is passed on unchanged."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        for line in captured.getvalue().splitlines():
            if _RUNTIME_LINE.match(line):
                logger.debug("executorch runtime: %s", line)
            elif line:
                print(line, file=sys.stderr)


def _pte_threads(n: int) -> None:
    """Size ExecuTorch's threadpool to ``n`` (call with ``_PTE_LOCK`` held)."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() == n:
        return
    for program in list(_PTE_LIVE):
        program._unload()
    gc.collect()  # the delegates go before the pool they point to
    with _runtime_log():
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
            with _runtime_log():
                self._program = _executorch()[3].get().load_program(self._raw)
                self._method = self._program.load_method("forward")
        except Exception as exc:  # noqa: BLE001 - the runtime raises many types
            raise ArtifactError(f"Artifact is not a loadable ExecuTorch program ({type(exc).__name__}: {str(exc)[:200]}); "
                                "expected a .pte written by shrinkflow.") from None

    def _unload(self) -> None:
        self._method = self._program = None

    @property
    def metadata(self):
        """The ``forward`` method's metadata as ExecuTorch gives it (its inputs' dtypes and largest sizes)."""
        return self._method.metadata

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
