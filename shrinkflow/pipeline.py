"""Run recipes: build a variant step by step, measure it, judge it against the budget.

``run_variant`` is the unit a worker executes; ``sweep`` is the plain in-process loop over a
whole spec (used by the benchmark and as the reference for the orchestrated flow).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from torch import nn

from shrinkflow import artifact, auto, budget as budget_mod, steps
from shrinkflow.budget import MB, DeviceProfile
from shrinkflow.cache import BlobCache
from shrinkflow.measure import count_macs, measure
from shrinkflow.select import select
from shrinkflow.specs import Budget, Recipe, SweepResult, SweepSpec, VariantResult
from shrinkflow.steps import Context, context
from shrinkflow.workloads import Workload

logger = logging.getLogger(__name__)


def build(ctx: Context, recipe: Recipe) -> tuple[nn.Module, int]:
    """The recipe's model: its training prefix from the prefix cache (or computed and stored
    there), then its quantize steps. Returns the model and its float MACs."""
    model, _ = steps.materialize(ctx, [s for s in recipe.steps if s.kind != "quantize"])
    macs = count_macs(model, ctx.workload.example_inputs)
    for spec in (s for s in recipe.steps if s.kind == "quantize"):
        model = steps.STEPS["quantize"].apply(ctx, model, spec)
    return model.eval(), macs


def min_size_bytes(ctx: Context, recipe: Recipe) -> int:
    """A lower bound on the shipped size, computable before any training."""
    params, bytes_per = sum(p.numel() for p in ctx.workload.teacher.parameters()), 4.0
    for spec in recipe.steps:
        params, bytes_per = steps.STEPS[spec.kind].size_floor(ctx, params, bytes_per, spec)
    return int(params * bytes_per * 0.5)  # 0.5: room for what entropy coding can still save


def precheck(ctx: Context, recipe: Recipe, limits: Budget) -> str | None:
    """Why ``recipe`` is not worth training (it acts on almost nothing, or cannot fit the size
    limit whatever training does), or None."""
    if reason := auto.not_applicable(ctx.workload.teacher, recipe):
        return reason
    if limits.max_size_mb is not None and (floor := min_size_bytes(ctx, recipe)) > limits.max_size_mb * MB:
        return f"needs >= {floor / MB:.3f} MB before training > max_size_mb {limits.max_size_mb}"
    return None


def run_variant(ctx: Context, recipe: Recipe, profile: DeviceProfile, limits: Budget,
                baseline_quality: float | None, max_threads: int | None = None) -> tuple[VariantResult, artifact.Packed | None]:
    """Build, pack, measure and judge one recipe. Skips it if it cannot fit the size limit."""
    t0 = time.perf_counter()
    if reason := precheck(ctx, recipe, limits):
        return VariantResult(name=recipe.name, recipe=recipe, skipped=reason), None
    model, macs = build(ctx, recipe)
    return evaluate(ctx, recipe.name, model, macs, profile, limits, baseline_quality, recipe, t0, max_threads)


def evaluate(ctx: Context, name: str, model: nn.Module, macs: int | None, profile: DeviceProfile,
             limits: Budget, baseline_quality: float | None, recipe: Recipe | None = None,
             t0: float | None = None, max_threads: int | None = None) -> tuple[VariantResult, artifact.Packed]:
    """Pack, measure and judge a built model. ``max_threads`` caps the measuring threads (a
    worker sharing the host with others gets its share of the cores, not all of them)."""
    t0 = time.perf_counter() if t0 is None else t0
    wl = ctx.workload
    runtime = recipe.runtime if recipe is not None else "torch"
    packed = dataclasses.replace(artifact.pack(model, wl.example_inputs, wl.dynamic_dims, runtime, wl.max_dims), assets=wl.files(model))
    n_threads = min(limits.threads, max_threads) if max_threads else limits.threads
    extra_fn = (lambda m: wl.extra_metrics(m, wl.test)) if wl.extra_metrics else None
    report = measure(model, wl.example_inputs, threads_=n_threads, power_w=profile.active_power_w,
                     quality_fn=lambda m: wl.quality(m, wl.test), extra_fn=extra_fn, macs=macs, packed=packed)
    baseline = report.quality if baseline_quality is None else baseline_quality
    verdict = budget_mod.check(report, report.quality, baseline, limits)
    result = VariantResult(name=name, recipe=recipe, report=report, verdict=verdict, seconds=time.perf_counter() - t0)
    logger.info("%s: quality %.4f size %d B p50 %.3f ms fits=%s", name, report.quality, report.size_bytes,
                report.latency_p50_ms, verdict.fits)
    return result, packed


def rejudge(result: VariantResult, limits: Budget, baseline_quality: float | None) -> VariantResult:
    """An earlier variant's record judged against this sweep's budget (measurements unchanged)."""
    if result.report is None:
        return result
    verdict = budget_mod.check(result.report, result.report.quality, baseline_quality, limits)
    return result.model_copy(update={"verdict": verdict})


def recipes_for(spec: SweepSpec, workload: Workload, limits: Budget) -> tuple[Recipe, ...]:
    """The spec's recipes, else the workload's, else a sweep derived from the model (never empty)."""
    if spec.recipes or workload.default_recipes:
        return spec.recipes or workload.default_recipes
    return auto.default_recipes(workload.teacher, workload.task, workload.make_student is not None, limits)


def sweep(spec: SweepSpec, cache: BlobCache | Path | None = None, workload: Workload | None = None) -> SweepResult:
    """The whole sweep in this process: teacher baseline, every recipe, selection."""
    profile, limits = budget_mod.resolve(spec.device, spec.budget)
    from shrinkflow import workloads

    wl = workload or workloads.load(spec.workload, seed=spec.seed)
    ctx = context(wl, cache, spec.seed)
    teacher, _ = evaluate(ctx, "teacher", wl.teacher, None, profile, limits, None)
    results = []
    for recipe in recipes_for(spec, wl, limits):
        result, _ = run_variant(ctx, recipe, profile, limits, teacher.report.quality)
        results.append(result)
    return SweepResult(name=spec.name, device=spec.device, budget=limits, teacher=teacher, variants=tuple(results),
                       selection=select(results, spec.objective, spec.quality_tolerance), teacher_forward_samples=ctx.teacher_out.forward_samples)
