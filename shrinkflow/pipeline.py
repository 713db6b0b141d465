"""Run recipes: build a variant step by step, measure it, judge it against the budget.

``run_variant`` is the unit a worker executes; ``sweep`` is the plain in-process loop over a
whole spec (used by the benchmark and as the reference for the orchestrated flow).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from shrinkflow import artifact, auto, steps
from shrinkflow import budget as budget_mod
from shrinkflow.budget import MB, DeviceProfile, ood_metric
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


def precheck(ctx: Context, recipe: Recipe, limits: Budget, profile: DeviceProfile | None = None) -> str | None:
    """Why ``recipe`` is not worth training (its runtime does not run on the device, it acts on
    almost nothing, or it cannot fit the size limit whatever training does), or None."""
    if profile is not None and recipe.runtime not in profile.runtimes:
        return (f"not applicable: runtime {recipe.runtime!r} does not run on {profile.name} "
                f"(it runs {', '.join(profile.runtimes)})")
    if reason := auto.not_applicable(ctx.workload.teacher, recipe):
        return reason
    if limits.max_size_mb is not None and (floor := min_size_bytes(ctx, recipe)) > limits.max_size_mb * MB:
        return f"needs >= {floor / MB:.3f} MB before training > max_size_mb {limits.max_size_mb}"
    return None


def run_variant(ctx: Context, recipe: Recipe, profile: DeviceProfile, limits: Budget,
                baseline_quality: float | None, max_threads: int | None = None,
                validation: bool = False) -> tuple[VariantResult, artifact.Packed | None]:
    """Build, pack, measure and judge one recipe. Skips it if it cannot fit the size limit."""
    t0 = time.perf_counter()
    if reason := precheck(ctx, recipe, limits, profile):
        return VariantResult(name=recipe.name, recipe=recipe, skipped=reason), None
    model, macs = build(ctx, recipe)
    return evaluate(ctx, recipe.name, model, macs, profile, limits, baseline_quality, recipe, t0, max_threads, validation)


def evaluate(ctx: Context, name: str, model: nn.Module, macs: int | None, profile: DeviceProfile,
             limits: Budget, baseline_quality: float | None, recipe: Recipe | None = None,
             t0: float | None = None, max_threads: int | None = None,
             validation: bool = False, runtime: str | None = None) -> tuple[VariantResult, artifact.Packed]:
    """Pack, measure and judge a built model. ``max_threads`` caps the measuring threads (a
    worker sharing the host with others gets its share of the cores, not all of them).
    ``validation``: also record the quality on the validation split (``extra["quality_val"]``),
    what a search trial reports to its sampler, so that the test split only judges. ``runtime``:
    the one to ship for (default: the recipe's, else torch)."""
    t0 = time.perf_counter() if t0 is None else t0
    wl = ctx.workload
    runtime = runtime or (recipe.runtime if recipe is not None else "torch")
    packed = dataclasses.replace(artifact.pack(model, wl.example_inputs, wl.dynamic_dims, runtime, wl.max_dims), assets=wl.files(model))
    n_threads = min(limits.threads, max_threads) if max_threads else limits.threads
    report = measure(model, wl.example_inputs, threads_=n_threads, power_w=profile.active_power_w,
                     quality_fn=lambda m: wl.quality(m, wl.test),
                     extra_fn=extra_metrics(wl, baseline_quality is None, validation),
                     macs=macs, packed=packed, longest=wl.longest)
    baseline = report.quality if baseline_quality is None else baseline_quality
    verdict = budget_mod.check(report, report.quality, baseline, limits)
    result = VariantResult(name=name, recipe=recipe, report=report, verdict=verdict, seconds=time.perf_counter() - t0)
    ood = " ".join(f"{n} {report.extra[ood_metric('quality', n)]:.4f}" for n in wl.ood)
    logger.info("%s: quality %.4f%s size %d B p50 %.3f ms fits=%s", name, report.quality, f" (ood: {ood})" if ood else "",
                report.size_bytes, report.latency_p50_ms, verdict.fits)
    return result, packed


def ood_metrics(wl: Workload, model: nn.Module, is_teacher: bool = False) -> dict[str, float]:
    """On every OOD set of ``wl``: ``quality_ood_<name>``, the drop against the teacher there
    (``quality_drop_ood_<name>``, what the budget judges) and each extra metric (``<metric>_ood_<name>``).
    ``is_teacher``: ``model`` is the teacher as shipped; its qualities become the baselines."""
    out = {}
    for name, split in wl.ood.items():
        quality = float(wl.quality(model, split))
        if is_teacher:
            wl.ood_baselines.setdefault(name, quality)
        out[ood_metric("quality", name)] = quality
        out[ood_metric("quality_drop", name)] = (quality if is_teacher else wl.ood_baseline(name)) - quality
        if wl.extra_metrics:
            out |= {ood_metric(k, name): float(v) for k, v in wl.extra_metrics(model, split).items()}
    return out


def extra_metrics(wl: Workload, is_teacher: bool = False,
                  validation: bool = False) -> Callable[[nn.Module], dict[str, float]] | None:
    """What ``measure`` records in ``Report.extra`` for ``wl``: its extra metrics on ``test``, then
    :func:`ood_metrics`, and with ``validation`` the quality on ``val``; None when there is nothing."""
    if not wl.extra_metrics and not wl.ood and not validation:
        return None

    def extra(model: nn.Module) -> dict[str, float]:
        out = (wl.extra_metrics(model, wl.test) if wl.extra_metrics else {}) | ood_metrics(wl, model, is_teacher)
        return out | ({"quality_val": float(wl.quality(model, wl.val))} if validation else {})

    return extra


def rejudge(result: VariantResult, limits: Budget, baseline_quality: float | None) -> VariantResult:
    """An earlier variant's record judged against this sweep's budget (measurements unchanged; the
    drops on OOD sets are in its ``Report.extra``, so no teacher is needed)."""
    if result.report is None:
        return result
    verdict = budget_mod.check(result.report, result.report.quality, baseline_quality, limits)
    return result.model_copy(update={"verdict": verdict})


def recipes_for(spec: SweepSpec, workload: Workload, limits: Budget) -> tuple[Recipe, ...]:
    """The recipes a sweep runs as written: the spec's (with a search, its seeds; none is fine);
    without a search, the workload's own list, else a list derived from the model (never empty)."""
    if spec.recipes or spec.searching:
        return spec.recipes or ()
    return workload.default_recipes or auto.default_recipes(workload.teacher, workload.task,
                                                            workload.make_student is not None, limits)


def sweep(spec: SweepSpec, cache: BlobCache | Path | None = None, workload: Workload | None = None) -> SweepResult:
    """The whole sweep in this process: teacher baseline, every recipe, selection."""
    profile, limits = budget_mod.resolve(spec.device, spec.budget)
    from shrinkflow import workloads

    wl = workload or workloads.load(**spec.workload_args())
    ctx = context(wl, cache, spec.seed)
    teacher, _ = evaluate(ctx, "teacher", wl.teacher, None, profile, limits, None)
    results = []
    for recipe in recipes_for(spec, wl, limits):
        result, _ = run_variant(ctx, recipe, profile, limits, teacher.report.quality)
        results.append(result)
    return SweepResult(name=spec.name, device=spec.device, budget=limits, teacher=teacher, variants=tuple(results),
                       selection=select(results, spec.objective, spec.quality_tolerance), teacher_forward_samples=ctx.forward_samples)
