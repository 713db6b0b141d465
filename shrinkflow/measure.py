"""One measurement for the teacher and every variant: size, params, MACs, latency, memory, energy.

Latency, memory and quality are taken on the deployable artifact as it will ship (the packed
program loaded back), not on the training-time module, so that what is reported is what runs.

Latency that load cannot flip: every model call is followed by a call of a fixed reference
kernel, and each call's time is scaled by how much slower than on a quiet host the reference
ran right after it (:func:`timed`, :func:`latency`). The quiet figure is the host's calibration
(:func:`quiet_reference_ms`). The final candidates of a sweep are timed once more together,
interleaved (:func:`retime`), before the winner is chosen.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shrinkflow import artifact
from shrinkflow.export import GRAPH_LOCK
from shrinkflow.ort import OrtProgram
from shrinkflow.pte import PteProgram
from shrinkflow.specs import Report

logger = logging.getLogger(__name__)

RAPL_ROOT = Path("/sys/class/powercap")
_SKIP_COUNT = ("scale", "zero_point", "num_batches_tracked", "running_mean", "running_var")


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes held by a tensor, looking inside tensor subclasses (torchao's quantized weights)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) weight elements; quantization scales and BN statistics are not counted."""
    total = nonzero = 0
    for name, t in _weights(model).items():
        if name.rsplit(".", 1)[-1].lstrip("_").startswith(_SKIP_COUNT) or t.numel() <= 1:
            continue
        total += t.numel()
        dense = t.dequantize() if hasattr(t, "dequantize") and type(t) is not torch.Tensor else t
        nonzero += int(torch.count_nonzero(dense.detach()).item()) if dense.dtype != torch.bool else t.numel()
    return total, nonzero


#: Gate blocks per recurrent cell kind: each is an (input + hidden) x hidden GEMM per time step.
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _rnn_macs(module: nn.RNNBase, x: torch.Tensor) -> int:
    """Multiply-accumulates of a recurrent layer's gates over its input ``x``: torch's FLOP counter
    does not count the fused RNN kernels."""
    steps, batch = (x.shape[1], x.shape[0]) if module.batch_first else (x.shape[0], x.shape[1])
    if x.dim() == 2:  # unbatched (L, H_in)
        steps, batch = x.shape[0], 1
    directions = 2 if module.bidirectional else 1
    macs = 0
    for layer in range(module.num_layers):
        width_in = module.input_size if layer == 0 else module.hidden_size * directions
        macs += _GATES.get(module.mode, 1) * directions * (width_in + module.hidden_size) * module.hidden_size
    return macs * steps * batch


def count_macs(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward pass at the example's batch size (FLOPs / 2), recurrent
    layers' gates included where torch's counter does not see them (a fused LSTM kernel)."""
    calls = []
    def seen(mod, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor):  # a PackedSequence is left to the counter
            calls.append((mod, x))

    hooks = [m.register_forward_pre_hook(seen, with_kwargs=True) for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    unseen = 0
    for module, x in calls:
        with FlopCounterMode(display=False) as alone, torch.inference_mode():
            module(x)
        unseen += _rnn_macs(module, x) if alone.get_total_flops() == 0 else 0
    return counter.get_total_flops() // 2 + unseen


class ReferenceNet(nn.Module):
    """The reference kernel: a fixed chain of small fp32 GEMMs (a (256, 64) batch through two
    64x64 weights, 12 times: about 12.6M multiply-adds over a working set of about 100 kB). It is
    timed right after every model call, in the model's own runtime, so whatever slows the model
    at that moment (other processes, a busy core, a throttled clock) slows it too, and the ratio
    of the two stays what it would be on a quiet host. Its working set is kept small so that it
    does not evict the model's weights from the core's caches between calls."""

    def __init__(self, width: int = 64, depth: int = 12) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("w0", torch.randn(width, width, generator=gen) / width**0.5)
        self.register_buffer("w1", torch.randn(width, width, generator=gen) / width**0.5)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = torch.relu(x @ (self.w0 if i % 2 == 0 else self.w1))
        return x


class Reference:
    """The reference kernel bound to its input, callable with no arguments. ``kind`` names the
    runtime it runs in ("torch": torch's intra-op threads; "xnnpack": an ExecuTorch program on
    XNNPACK's thread pool, for .pte variants, whose threads load slows differently)."""

    def __init__(self, kind: str = "torch") -> None:
        self.kind = kind
        self.x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
        net = ReferenceNet().eval()
        runtime = {"xnnpack": "executorch", "ort": "onnx"}.get(kind)
        self.program = net if runtime is None else \
            artifact.unpack(artifact.pack(net, (self.x,), runtime=runtime, max_dims={0: len(self.x)}))

    def __call__(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.program(self.x)


REFERENCE = Reference()


@functools.cache
def _reference(kind: str) -> Reference:
    return REFERENCE if kind == "torch" else Reference(kind)


def reference_for(program: Callable) -> Reference:
    """The reference kernel that runs in ``program``'s runtime."""
    if isinstance(program, PteProgram):
        return _reference("xnnpack")
    return _reference("ort") if isinstance(program, OrtProgram) else REFERENCE


def reference_kind(artifact_format: str) -> str:
    """The reference kind a report of this artifact format was timed against."""
    return {"executorch": "xnnpack", "onnx": "ort"}.get(artifact_format, "torch")


#: Consecutive reference calls whose median is one window of the host calibration.
WINDOW = 10


@dataclass
class Timing:
    """Wall times (ms) of model calls, each followed by one reference-kernel call."""

    model_ms: list[float]
    reference_ms: list[float]

    def normalised(self, quiet_reference_ms: float) -> list[float]:
        """Each call's time scaled by how much slower than quiet the reference ran right after it."""
        return sorted(m / r * quiet_reference_ms for m, r in zip(self.model_ms, self.reference_ms))

    def windows(self) -> list[float]:
        """Medians of the reference's consecutive windows of WINDOW calls."""
        refs = self.reference_ms
        return [statistics.median(refs[i:i + WINDOW]) for i in range(0, len(refs) - WINDOW + 1, WINDOW)]


def _call(model: Callable, example_inputs: tuple, reference: Callable) -> tuple[float, float]:
    t0 = time.perf_counter_ns()
    model(*example_inputs)
    t1 = time.perf_counter_ns()
    reference()
    return (t1 - t0) / 1e6, (time.perf_counter_ns() - t1) / 1e6


def timed(model: Callable, example_inputs: tuple, warmup: int = 10, repeats: int = 50,
          reference: Callable | None = None) -> Timing:
    """``repeats`` single calls of ``model``, each followed by one call of ``reference`` (by
    default the reference kernel in the model's runtime)."""
    reference = reference or reference_for(model)
    pairs = []
    with torch.inference_mode():
        for _ in range(warmup):
            _call(model, example_inputs, reference)
        for _ in range(repeats):
            pairs.append(_call(model, example_inputs, reference))
    return Timing([m for m, _ in pairs], [r for _, r in pairs])


def retime(candidates: dict[str, tuple[Callable, tuple]], rounds: int = 30, warmup: int = 5,
           reference: Callable | None = None) -> dict[str, Timing]:
    """Time several programs together: in each round every candidate is called once, each call
    followed by the reference, the order rotated from round to round, so no candidate is timed
    in a quieter or busier moment than the others. ``candidates``: name -> (program, inputs)."""
    names = list(candidates)
    out = {name: Timing([], []) for name in names}
    with torch.inference_mode():
        refs = {name: reference or reference_for(candidates[name][0]) for name in names}
        for name in names:
            for _ in range(warmup):
                _call(*candidates[name], refs[name])
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                m, ref = _call(*candidates[name], refs[name])
                out[name].model_ms.append(m)
                out[name].reference_ms.append(ref)
    return out


def _calibration_file() -> Path:
    from shrinkflow.workloads import home  # the one definition of the state directory

    return home() / "host-reference.json"


def _host_key(n_threads: int, kind: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.machine())
    return f"{cpu} | {os.cpu_count()} cpus | {n_threads} threads | torch {torch.__version__} | reference {kind}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


_QUIET: dict[str, float] = {}
_QUIET_LOCK = threading.Lock()


def quiet_reference_ms(n_threads: int, timing: Timing | None = None, kind: str = "torch") -> float:
    """The reference kernel's time on this host when quiet, at ``n_threads``: the lowest window
    median seen so far, in this process, in the other processes sharing its shrinkflow home (a
    sweep's workers) or in earlier runs (kept in $SHRINKFLOW_HOME/host-reference.json, read at
    every call), updated with ``timing``. It only ever goes down, towards the quiet figure; a
    host that has never been quiet while shrinkflow ran reads slow until it is."""
    key, path = _host_key(n_threads, kind), _calibration_file()
    with _QUIET_LOCK:
        try:
            saved = float(json.loads(path.read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            saved = float("inf")
        if saved < _QUIET.get(key, float("inf")):
            _QUIET[key] = saved
        seen = (timing.windows() or [statistics.median(timing.reference_ms)]) if timing and timing.reference_ms else []
        if not seen and key not in _QUIET:
            with threads(n_threads):
                ref = _reference(kind)
                seen = timed(lambda: None, (), warmup=5, repeats=5 * WINDOW, reference=ref).windows()
        best = min([*seen, _QUIET.get(key, float("inf"))])
        if best < _QUIET.get(key, float("inf")):
            _QUIET[key] = best
            _save_quiet(path, key, best)
        return _QUIET[key]


def _save_quiet(path: Path, key: str, value: float) -> None:
    """Merge ``key`` into the calibration file (atomic replace; a lost race loses one window)."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = min(value, float(data.get(key, value)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        logger.warning("host calibration not saved to %s (%s)", path, exc)


@dataclass(frozen=True)
class Latency:
    """Normalised latency figures of one program, as the Report carries them."""

    p50_ms: float
    p95_ms: float
    ci_ms: tuple[float, float]
    runs: int
    raw_p50_ms: float
    reference_ms: float
    quiet_ms: float  # the host calibration the figures are scaled to


def with_latency(report: Report, lat: Latency, threads_: int | None = None) -> Report:
    """``report`` with new latency figures (an estimated energy, power x p50, rescaled with them)."""
    energy = report.energy_mj * lat.p50_ms / report.latency_p50_ms \
        if report.energy_source == "estimated" and report.latency_p50_ms > 0 else report.energy_mj
    return report.model_copy(update={
        "latency_p50_ms": lat.p50_ms, "latency_p95_ms": lat.p95_ms, "latency_ci_ms": lat.ci_ms, "latency_runs": lat.runs,
        "latency_raw_p50_ms": lat.raw_p50_ms, "reference_ms": lat.reference_ms, "quiet_reference_ms": lat.quiet_ms,
        "energy_mj": energy, "threads": threads_ or report.threads})


def rescaled(report: Report, quiet_ms: float) -> Report:
    """``report`` scaled to a newer host calibration: its normalised figures are per-call ratios to
    the reference times the quiet reference time, so a quieter calibration found later in the sweep
    (the first measurements of a busy host calibrate against themselves) scales them all alike."""
    if report.quiet_reference_ms is None or quiet_ms >= report.quiet_reference_ms:
        return report
    f = quiet_ms / report.quiet_reference_ms
    ci = (report.latency_ci_ms[0] * f, report.latency_ci_ms[1] * f) if report.latency_ci_ms else None
    energy = report.energy_mj * f if report.energy_source == "estimated" else report.energy_mj
    extra = {k: v * f if k in LONGEST_KEYS else v for k, v in report.extra.items()}
    return report.model_copy(update={"latency_p50_ms": report.latency_p50_ms * f, "latency_p95_ms": report.latency_p95_ms * f,
                                     "latency_ci_ms": ci, "energy_mj": energy, "quiet_reference_ms": quiet_ms,
                                     "extra": extra})


#: ``Report.extra`` latencies at the longest input, scaled with the others by :func:`rescaled`.
LONGEST_KEYS = ("latency_p50_ms_longest", "latency_p95_ms_longest")


def latency(timing: Timing, quiet_ms: float) -> Latency:
    """p50/p95 of the normalised calls, with a distribution-free 95% interval for the p50
    (order statistics n/2 -+ 0.98 sqrt(n), the normal approximation to the binomial)."""
    xs = timing.normalised(quiet_ms)
    n = len(xs)
    lo, hi = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n))), min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)))
    return Latency(p50_ms=statistics.median(xs), p95_ms=xs[min(n - 1, int(0.95 * n))], ci_ms=(xs[lo], xs[hi]),
                   runs=n, raw_p50_ms=statistics.median(timing.model_ms), reference_ms=statistics.median(timing.reference_ms),
                   quiet_ms=quiet_ms)


def memory_profiler() -> torch.autograd.profiler.profile:
    """torch's CPU profiler (Kineto) recording allocations, as ``torch.profiler.profile`` starts it.

    Not through ``torch.profiler.profile`` itself: its first start in a process checks
    ``hasattr(torch, "_inductor")``, which imports torch's compiler, a second of CPU in every
    process that measures (each Dask worker among them), which measuring does not need."""
    return torch.autograd.profiler.profile(use_cpu=True, profile_memory=True, use_kineto=True)


def peak_activation_bytes(model: Callable, example_inputs: tuple) -> int:
    """Peak of live memory allocated during one forward pass, from the profiler's allocation events."""
    with GRAPH_LOCK, memory_profiler() as prof, torch.inference_mode():
        model(*example_inputs)
    live = peak = 0
    for ev in sorted(prof.function_events, key=lambda e: e.time_range.start):
        live += ev.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def rapl_energy_uj(root: Path = RAPL_ROOT) -> int | None:
    """Package energy counter in microjoules, or None when the host exposes no readable RAPL."""
    total, found = 0, False
    for zone in sorted(root.glob("intel-rapl:[0-9]*")):
        if ":" in zone.name.split("intel-rapl:", 1)[1]:
            continue  # a sub-zone (core, dram): already inside its package
        try:
            total += int((zone / "energy_uj").read_text().strip())
            found = True
        except (OSError, ValueError):
            return None
    return total if found else None


def energy_mj(model: Callable, example_inputs: tuple, p50_ms: float, power_w: float,
              rapl_root: Path = RAPL_ROOT, calls: int = 200) -> tuple[float, str]:
    """Energy per inference: RAPL-measured where readable, else device power x latency."""
    start = rapl_energy_uj(rapl_root)
    if start is not None:
        with torch.inference_mode():
            for _ in range(calls):
                model(*example_inputs)
        end = rapl_energy_uj(rapl_root)
        if end is not None and end > start:
            return (end - start) / 1000.0 / calls, "measured-rapl"
    return power_w * p50_ms, "estimated"  # W x ms = mJ


def measure(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    threads_: int = 1,
    power_w: float = 1.0,
    quality_fn: Callable[[nn.Module], float] | None = None,
    extra_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    macs: int | None = None,
    packed: artifact.Packed | None = None,
    repeats: int = 50,
    longest: tuple[torch.Tensor, ...] | None = None,
) -> Report:
    """Measure ``model`` as it ships. ``macs`` may be given from the float architecture, since
    quantized kernels are not all visible to the FLOP counter; quantization changes MAC precision,
    not their count. ``extra_fn(shipped)`` adds named metrics (``Report.extra``). ``longest``: an
    input at the longest length users send; the program is timed on it too (``extra``:
    ``latency_p50_ms_longest``, ``latency_p95_ms_longest``) and its peak memory is taken on it."""
    cores = host_cores()
    if threads_ > cores:
        logger.info("device threads %d > host cores %d: measuring with %d", threads_, cores, cores)
        threads_ = cores  # oversubscribed threads measure the host's contention, not the model
    packed = packed or artifact.pack(model, example_inputs)
    shipped = packed.shipped()
    total, nonzero = count_params(model)
    weight_bytes = sum(tensor_bytes(t) for t in _weights(shipped).values())
    if isinstance(shipped, PteProgram):  # its memory is outside torch's allocator
        weight_bytes = shipped.program_bytes
    with threads(threads_):
        timing = timed(shipped, example_inputs, repeats=repeats)
        lat = latency(timing, quiet_reference_ms(threads_, timing, reference_for(shipped).kind))
        p50 = lat.p50_ms
        longest_ms = {}
        if longest is not None:
            try:
                timing_long = timed(shipped, longest, warmup=3, repeats=max(5, repeats // 2))
            except Exception as exc:  # noqa: BLE001 - a program shipped at fixed sizes (an export that specialised them)
                logger.warning("not timed at the longest input %s: the program refuses it (%s: %s)",
                               [tuple(t.shape) for t in longest], type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                longest = None
            else:
                lat_long = latency(timing_long, quiet_reference_ms(threads_, timing_long, reference_for(shipped).kind))
                longest_ms = {"latency_p50_ms_longest": lat_long.p50_ms, "latency_p95_ms_longest": lat_long.p95_ms}
        # ExecuTorch plans its activations ahead; ONNX Runtime's peak (weights, arena, activations)
        # is measured in a process of its own; torch programs: the allocator's peak over a call.
        peak_inputs = longest if longest is not None else example_inputs
        ort_peak = shipped.peak_bytes(peak_inputs, threads_) if isinstance(shipped, OrtProgram) else None
        if ort_peak is not None:
            weight_bytes, act = 0, ort_peak
        elif isinstance(shipped, OrtProgram):  # no peak counter here: the program's bytes and the eager activations
            weight_bytes, act = shipped.program_bytes, peak_activation_bytes(model, peak_inputs)
        else:
            act = shipped.planned_bytes if isinstance(shipped, PteProgram) else \
                peak_activation_bytes(shipped, peak_inputs)
        energy, source = energy_mj(shipped, example_inputs, p50, power_w)
        quality = quality_fn(shipped) if quality_fn else None
        extra = {k: float(v) for k, v in extra_fn(shipped).items()} if extra_fn else {}
    extra |= longest_ms
    return Report(
        quality=quality,
        size_bytes=len(packed.data),
        raw_size_bytes=packed.raw_size,
        params=total,
        nonzero_params=nonzero,
        sparsity=1.0 - nonzero / total if total else 0.0,
        macs=macs if macs is not None else count_macs(model, example_inputs),
        latency_p50_ms=lat.p50_ms,
        latency_p95_ms=lat.p95_ms,
        latency_ci_ms=lat.ci_ms,
        latency_runs=lat.runs,
        latency_raw_p50_ms=lat.raw_p50_ms,
        reference_ms=lat.reference_ms,
        quiet_reference_ms=lat.quiet_ms,
        peak_memory_bytes=weight_bytes + act,
        energy_mj=energy,
        energy_source=source,
        threads=threads_,
        artifact_format=packed.format,
        extra=extra,
    )
