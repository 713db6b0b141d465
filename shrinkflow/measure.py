"""One measurement for the teacher and every variant: size, params, MACs, latency, memory, energy.

Latency, memory and quality are taken on the deployable artifact as it will ship (the packed
program loaded back), not on the training-time module, so that what is reported is what runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shrinkflow import artifact
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


def count_macs(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward pass at the example's batch size (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(*example_inputs)
    return counter.get_total_flops() // 2


def latency_ms(model: Callable, example_inputs: tuple, warmup: int = 10, repeats: int = 50) -> tuple[float, float]:
    """(p50, p95) of single calls in milliseconds, after warm-up."""
    samples = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(*example_inputs)
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            model(*example_inputs)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.95 * len(samples)))]


def peak_activation_bytes(model: Callable, example_inputs: tuple) -> int:
    """Peak of live memory allocated during one forward pass, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with artifact.GRAPH_LOCK, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.inference_mode():
        model(*example_inputs)
    live = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
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
) -> Report:
    """Measure ``model`` as it ships. ``macs`` may be given from the float architecture, since
    quantized kernels are not all visible to the FLOP counter; quantization changes MAC precision,
    not their count. ``extra_fn(shipped)`` adds named metrics (``Report.extra``)."""
    host_cores = os.cpu_count() or 1
    if threads_ > host_cores:
        logger.info("device threads %d > host cores %d: measuring with %d", threads_, host_cores, host_cores)
        threads_ = host_cores  # oversubscribed threads measure the host's contention, not the model
    packed = packed or artifact.pack(model, example_inputs)
    shipped = packed.shipped()
    total, nonzero = count_params(model)
    weight_bytes = sum(tensor_bytes(t) for t in _weights(shipped).values())
    if isinstance(shipped, artifact.PteProgram):  # its memory is planned ahead, outside torch's allocator
        weight_bytes = shipped.program_bytes
    with threads(threads_):
        p50, p95 = latency_ms(shipped, example_inputs, repeats=repeats)
        act = shipped.planned_bytes if isinstance(shipped, artifact.PteProgram) else peak_activation_bytes(shipped, example_inputs)
        energy, source = energy_mj(shipped, example_inputs, p50, power_w)
        quality = quality_fn(shipped) if quality_fn else None
        extra = {k: float(v) for k, v in extra_fn(shipped).items()} if extra_fn else {}
    return Report(
        quality=quality,
        size_bytes=len(packed.data),
        raw_size_bytes=packed.raw_size,
        params=total,
        nonzero_params=nonzero,
        sparsity=1.0 - nonzero / total if total else 0.0,
        macs=macs if macs is not None else count_macs(model, example_inputs),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        peak_memory_bytes=weight_bytes + act,
        energy_mj=energy,
        energy_source=source,
        threads=threads_,
        artifact_format=packed.format,
        extra=extra,
    )
