"""The same models shipped for each runtime: torch.export, ExecuTorch (XNNPACK) and ONNX Runtime.

    python bench/runtimes.py

Two models the product was not written for, from tests/unit/plugin_workload.py: a MobileNetV2-style
CNN on sklearn's digits (BatchNorm, depthwise convolutions, inverted residuals) and a two-input
Hugging Face BERT classifier built from a config (input_ids, attention_mask). Each is shipped in
float and in int8 for every runtime, through the sweep's own path (`pipeline.run_variant`: pack,
measure the shipped program, score it on the test split), on the rpi4 preset's limits with the
host's 2 cores, one process, nothing else running. Latency is the reference-normalised p50 at
batch 1 (see the README's latency section); size is the shipped file (xz). Writes the "runtimes"
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import table, write_section  # noqa: E402

from shrinkflow import pipeline, steps  # noqa: E402
from shrinkflow.budget import resolve  # noqa: E402
from shrinkflow.specs import QuantSpec, Recipe  # noqa: E402
from tests.unit import plugin_workload  # noqa: E402

RECIPES = {
    "mobilenet_digits": (
        None,
        Recipe(name="torch-int8-static", steps=(QuantSpec(scheme="int8-static"),)),
        ("xnnpack-fp32", "executorch"),
        Recipe(name="xnnpack-int8", runtime="executorch", steps=(QuantSpec(scheme="int8-dynamic-intx"),)),
        ("ort-fp32", "onnx"),
        Recipe(name="ort-int8-static", runtime="onnx", steps=(QuantSpec(scheme="int8-static-ort"),)),
    ),
    "bert_pair": (
        None,
        Recipe(name="torch-int8-dynamic", steps=(QuantSpec(scheme="int8-dynamic", layers="linear"),)),
        ("xnnpack-fp32", "executorch"),
        Recipe(name="xnnpack-int8", runtime="executorch", steps=(QuantSpec(scheme="int8-dynamic-intx"),)),
        ("ort-fp32", "onnx"),
        Recipe(name="ort-int8-static", runtime="onnx", steps=(QuantSpec(scheme="int8-static-ort", layers="linear"),)),
    ),
}


def main() -> int:
    profile, limits = resolve("rpi4", None)
    rows = []
    for name, recipes in RECIPES.items():
        wl = getattr(plugin_workload, name)(seed=0).check()
        ctx = steps.context(wl, Path(tempfile.mkdtemp(prefix="runtimes-")), 0)
        for recipe in recipes:
            if isinstance(recipe, Recipe):
                result, _ = pipeline.run_variant(ctx, recipe, profile, limits, None)
                label, runtime = recipe.name, recipe.runtime
            else:  # the float teacher, shipped for a runtime (None: torch)
                label, runtime = recipe or ("torch-fp32", "torch")
                result, _ = pipeline.evaluate(ctx, label, wl.teacher, None, profile, limits, None, runtime=runtime)
            r = result.report
            if r is None:
                rows.append([name, label, runtime, "-", "-", "-", "-", result.skipped])
                continue
            rows.append([name, label, runtime, f"{r.quality:.4f}", f"{r.size_bytes / 1e3:.1f}",
                         f"{r.latency_p50_ms:.3f}", f"{r.peak_memory_bytes / 1e3:.1f}", r.artifact_format])
            print(rows[-1], flush=True)
    body = table(["model", "variant", "runtime", "accuracy", "size kB (xz)", "p50 ms (batch 1)", "peak memory kB", "format"], rows)
    body += ("\n\nPeak memory, in the runtime that ships: for a .pte the program's bytes plus ExecuTorch's planned memory; "
             "for a torch.export program its weights plus the allocator's peak over a call; for an ONNX program the growth "
             "of a fresh process's peak resident set while ONNX Runtime creates the session and runs it, once the runtime's "
             "one-time start-up was paid on a trivial graph (weights, pre-packed weights, arena and activations as ONNX "
             "Runtime holds them; its Python API exposes no allocator statistics). The ONNX figure includes the "
             "session's own allocations (about 1.3 MB here for a 25 kB program), so it is not comparable byte for byte "
             "with the others.")
    write_section("runtimes", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
