"""How a promoted model describes itself: the load snippet, the registered version's Markdown
description and readable tags, and the spec kept in those tags. Pure functions (no servers)."""

from __future__ import annotations

from shrinkflow import artifact
from shrinkflow.specs import Budget, SweepSpec, flatten

#: What loads each format, as the snippet's caption says it.
LOADERS = {"torch.export": "plain PyTorch", "torchscript": "plain PyTorch",
           "executorch": "the ExecuTorch runtime (pip install executorch)",
           "onnx": "ONNX Runtime (pip install onnxruntime)"}
_OPEN = {
    "torch.export": "import io, lzma, torch; model = torch.export.load(io.BytesIO(lzma.decompress(open({file!r}, 'rb')"
                    ".read()))).module()",
    "torchscript": "import io, lzma, torch; model = torch.jit.load(io.BytesIO(lzma.decompress(open({file!r}, 'rb').read())))",
    # data and program must stay alive while the method is used: the runtime reads from them
    "executorch": "import lzma, torch; from executorch.runtime import Runtime; data = lzma.decompress(open({file!r}, 'rb')"
                  ".read()); program = Runtime.get().load_program(data); method = program.load_method('forward')",
    "onnx": "import lzma, torch, onnxruntime as ort; session = ort.InferenceSession(lzma.decompress(open({file!r}, 'rb')"
            ".read()))",
}
_CALL = {"torch.export": "model({args})", "torchscript": "model({args})", "executorch": "method.execute([{args}])[0]",
         "onnx": "torch.from_numpy(session.run(None, {feeds})[0])"}
#: Budget field -> (label, unit) in the readable budget text.
_LIMITS = {"max_size_mb": ("size", "MB"), "max_latency_ms": ("p50 latency", "ms"),
           "max_peak_memory_mb": ("peak memory", "MB"), "max_energy_mj": ("energy", "mJ"),
           "max_quality_drop": ("quality drop vs teacher", "")}
SPEC_TAG = "spec."


def load_snippet(fmt: str, inputs: list[dict]) -> str:
    """One line of Python, run in the folder holding the pulled files, that loads the program,
    builds inputs of the program's names, dtypes and shapes, runs it and prints the output shape."""
    example = artifact.example_code(inputs)
    names = ", ".join(i["name"] for i in inputs)
    feeds = "{" + ", ".join(f"{i['name']!r}: {i['name']}.numpy()" for i in inputs) + "}"
    call = _CALL[fmt].format(args=names, feeds=feeds)
    show = "print(out.shape if isinstance(out, torch.Tensor) else [o.shape for o in out])"
    return "; ".join(p for p in (_OPEN[fmt].format(file=artifact.FILENAMES[fmt]), example, f"out = {call}", show) if p)


def budget_text(limits: Budget) -> str:
    """``size <= 0.4 MB, p50 latency <= 5 ms, 1 thread`` (limits left unset are omitted)."""
    parts = [f"{label} <= {value:g}{' ' + unit if unit else ''}"
             for key, (label, unit) in _LIMITS.items() if (value := getattr(limits, key)) is not None]
    return ", ".join([*parts, f"{limits.threads} thread{'s' if limits.threads > 1 else ''}"])


def metrics_text(m: dict[str, float]) -> str:
    """The headline measurements with units, e.g. ``quality 0.9667, size 34.6 kB, p50 0.600 ms, ...``."""
    parts = []
    if "quality" in m:
        parts.append(f"quality {m['quality']:.4f}")
    if "size_bytes" in m:
        parts.append(f"size {m['size_bytes'] / 1e3:,.1f} kB")
    for key, label, unit, digits in (("latency_p50_ms", "p50", "ms", 3), ("latency_p95_ms", "p95", "ms", 3),
                                     ("energy_mj", "energy", "mJ", 4)):
        if key in m:
            parts.append(f"{label} {m[key]:.{digits}f} {unit}")
    if "peak_memory_bytes" in m:
        parts.append(f"peak memory {m['peak_memory_bytes'] / 1e6:.2f} MB")
    return ", ".join(parts)


def spec_tags(spec: SweepSpec) -> dict[str, str]:
    """The sweep spec (without its recipes) as one readable tag per field: ``spec.budget.max_size_mb``."""
    return {SPEC_TAG + k: v for k, v in flatten(spec.model_dump(mode="json", exclude={"recipes"}, exclude_none=True)).items()}


def spec_from_tags(tags: dict[str, str]) -> SweepSpec | None:
    """The spec :func:`spec_tags` wrote (None if there is none); pydantic turns the strings back into numbers."""
    nested: dict = {}
    for key, value in tags.items():
        if key.startswith(SPEC_TAG):
            *parents, leaf = key.removeprefix(SPEC_TAG).split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return SweepSpec.model_validate(_lists(nested)) if nested else None


def _lists(node: object) -> object:
    """Undo :func:`flatten` of a list: a dict keyed 0, 1, ... becomes a list."""
    if not isinstance(node, dict):
        return node
    items = {k: _lists(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def version_description(variant: str, spec: SweepSpec, limits: Budget, metrics: dict[str, float],
                        inputs: list[dict], fmt: str, name: str, version: str) -> str:
    """The registered version's description in the MLflow UI (Markdown)."""
    flavor = "mlflow.pyfunc.load_model" if fmt in ("executorch", "onnx") else "mlflow.pytorch.load_model"
    call = {"executorch": "model.predict(x.numpy())",  # ONNX: a dict of outputs by name
            "onnx": "next(iter(model.predict(x.numpy()).values()))"}.get(fmt, "model(x)")
    return "\n".join([
        (f"**{variant}**: `{spec.workload}` compressed for `{spec.device}` by sweep `{spec.name}` "
         f"(objective {spec.objective})."), "",
        f"**Budget:** {budget_text(limits)}", "",
        f"**Measured:** {metrics_text(metrics)}", "",
        f"**Inputs:** {artifact.describe_inputs(inputs) or 'not recorded'}", "",
        f"**Shipped as** `{artifact.FILENAMES[fmt]}` ({fmt}, xz), loaded with {LOADERS[fmt]}.", "",
        "**Load it from MLflow:**", "", "```python", "import mlflow, torch",
        f"model = {flavor}('models:/{name}/{version}')",
        *([f"x = {artifact.example_code(inputs[:1]).split(' = ', 1)[1]}", f"print({call}.shape)"] if len(inputs) == 1 else []),
        "```", "",
        (f"**Or pull the shipped file:** `shrinkflow pull models:/{name}/{version} --out DIR` (checksums verified), "
         "which prints a snippet that loads and runs it."),
    ])
