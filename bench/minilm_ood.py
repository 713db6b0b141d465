"""MiniLM candidates judged in and out of domain: shipped size, cosine to the teacher on held-out
BBC sentences and on the OOD set (Python Language Reference prose), mean and 5th percentile.

    SHRINKFLOW_HOME=/tmp/ood-home python bench/minilm_ood.py [--only NAME ...] [--eager] [--device phone-entry]

Each candidate goes through the sweep's own path (``pipeline.run_variant``: build, pack for its
runtime, measure the shipped program, judge against the device budget, OOD sets included), with
the teacher's quality taken as 1.0 (cosine to itself). ``--eager`` only builds each candidate and
scores the eager model (no export): a quick screen. Prints one JSON line per candidate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from shrinkflow import artifact, budget, pipeline, workloads
from shrinkflow.cache import DirCache
from shrinkflow.specs import QuantSpec, Recipe, VocabSpec
from shrinkflow.steps import context
from shrinkflow.workloads import minilm

EMB4 = QuantSpec(scheme="int4-weight-only", layers="embedding", include=("*word_embeddings*",))
CANDIDATES = (
    Recipe(name="xnnpack-vocab+emb-int4+int8", steps=(VocabSpec(), EMB4, QuantSpec(scheme="int8-dynamic-intx", layers="linear")),
           runtime="executorch"),
    # the vocabulary cut over news + Wikipedia (shrinkflow.workloads.extra_text), with the default's mixed int4/int8
    Recipe(name="xnnpack-vocab+emb-int4+int4-qko+int8", steps=(VocabSpec(), EMB4, QuantSpec(
        scheme="int4-dynamic-intx", layers="linear", include=("*.query", "*.key", "*.output.dense"))), runtime="executorch"),
    Recipe(name="xnnpack-emb-int4+int4", steps=(EMB4, QuantSpec(scheme="int4-dynamic-intx", layers="linear")),
           runtime="executorch"),
    Recipe(name="xnnpack-emb-int4+int8", steps=(EMB4, QuantSpec(scheme="int8-dynamic-intx", layers="linear")),
           runtime="executorch"),
)


def eager_scores(wl, model: torch.nn.Module) -> dict[str, float]:
    out = {}
    for label, split in (("test", wl.test), *((f"ood_{n}", s) for n, s in wl.ood.items())):
        out[f"cos_{label}"] = minilm.cosine_quality(model, split)
        out[f"p5_{label}"] = minilm.similarity_metrics(model, split)["cosine_p5"]
    return out


def run(wl, ctx, recipe: Recipe, device: str, eager: bool) -> dict:
    t0 = time.perf_counter()
    if eager:
        model, _ = pipeline.build(ctx, recipe)
        return {"name": recipe.name, "eager": True, **eager_scores(wl, model), "seconds": round(time.perf_counter() - t0, 1)}
    profile, limits = budget.resolve(device)
    result, packed = pipeline.run_variant(ctx, recipe, profile, limits, 1.0)
    rep = result.report
    return {"name": recipe.name, "size_mb": rep.size_bytes / 1e6, "cos_test": rep.quality, **rep.extra,
            "p50_ms": rep.latency_p50_ms, "peak_mb": rep.peak_memory_bytes / 1e6, "fits": result.fits,
            "misses": [m.model_dump() for m in result.verdict.misses], **longest_call(wl, packed),
            "seconds": round(time.perf_counter() - t0, 1)}


def longest_call(wl, packed) -> dict:
    """The shipped program on its largest input (a full batch of sentences cut at max_length),
    against the eager teacher; and the memory ExecuTorch plans for it."""
    if packed is None or packed.format != "executorch":
        return {}
    program = artifact.unpack(packed)
    text = " ".join(minilm.ood_text.python_docs(minilm.split_sentences)[:40])  # far past any max_length
    ids = minilm.encode([text] * artifact.PTE_MAX_BATCH, pad_to=wl.max_dims[1])
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(program(ids), wl.teacher(ids), dim=-1)
    return {"long_call_shape": list(ids.shape), "long_call_cos_min": float(cos.min()),
            "planned_mb": program.planned_bytes / 1e6, "program_mb": program.program_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="candidate names (default: all, then the workload's defaults)")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--device", default="phone-entry")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    wl = workloads.load("minilm")
    print(json.dumps({"workload_seconds": round(time.perf_counter() - t0, 1), "ood_sentences": len(wl.ood[minilm.OOD_NAME])}),
          flush=True)
    ctx = context(wl, DirCache(workloads.home() / "cache"))
    pool = {r.name: r for r in (*CANDIDATES, *wl.default_recipes)}
    for name in args.only or list(pool):
        print(json.dumps(run(wl, ctx, pool[name], args.device, args.eager)), flush=True)


if __name__ == "__main__":
    main()
