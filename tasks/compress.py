"""Variant tasks: build, measure and track one recipe (or the teacher baseline).

Tasks exchange small records (VariantResult, run ids, URIs); models and tensors stay in the
worker, and the teacher's outputs come from the content-addressed cache on disk.
"""

from __future__ import annotations

import functools
import os
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shrinkflow import artifact, budget, pipeline, workloads
from shrinkflow.measure import threads
from shrinkflow.specs import Recipe, SweepSpec, TeacherInfo, VariantResult
from tasks import config, tracking


@functools.lru_cache(maxsize=4)
def _context(workload: str, seed: int) -> pipeline.Context:
    """The workload and cached teacher outputs, loaded once per worker process."""
    return pipeline.context(workloads.load(workload, seed=seed), config.cache_dir(), seed)


def _track(ctx: pipeline.Context, run_id: str, result: VariantResult, packed: artifact.Packed | None) -> VariantResult:
    t0 = time.perf_counter()
    if packed is not None:
        model_uri = tracking.log_model(run_id, artifact.unpack(packed), ctx.workload.example_inputs, packed.filename, packed.data)
        result = result.model_copy(update={"model_uri": model_uri, "artifact_uri": f"runs:/{run_id}/deploy/{packed.filename}"})
    result = result.model_copy(update={"run_id": run_id, "tracking_seconds": time.perf_counter() - t0})
    tracking.log_variant(run_id, result)
    tracking.finish(run_id)
    return result


@task(name="teacher", cache_policy=NO_CACHE)
def teacher_task(spec: SweepSpec, parent_run_id: str, experiment_id: str) -> TeacherInfo:
    """Resolve the workload, compute the teacher outputs once (cached), and log the baseline run."""
    log = get_run_logger()
    _context.cache_clear()  # a fresh sweep sees fresh data; variants in this process reuse it
    ctx = _context(spec.workload, spec.seed)
    log.info("teacher outputs %s: %d forward samples (0 = cache hit)", ctx.teacher_out.key[:12], ctx.teacher_out.forward_samples)
    profile, limits = budget.resolve(spec.device, spec.budget)
    run_id = tracking.start_child(parent_run_id, experiment_id, "teacher", role="baseline")
    result, packed = pipeline.evaluate(ctx, "teacher", ctx.workload.teacher, None, profile, limits, None)
    result = _track(ctx, run_id, result, packed)
    tracking.retrying(tracking.client().log_metric, parent_run_id, "teacher_forward_samples", ctx.teacher_out.forward_samples)
    return TeacherInfo(baseline=result, workload_name=ctx.workload.name, outputs_key=ctx.teacher_out.key, forward_samples=ctx.teacher_out.forward_samples,
                       recipes=spec.recipes or ctx.workload.default_recipes)


@task(name="variant", task_run_name="variant-{recipe.name}", cache_policy=NO_CACHE)
def variant_task(spec: SweepSpec, recipe: Recipe, parent_run_id: str, experiment_id: str,
                 baseline_quality: float) -> VariantResult:
    """One recipe: build it, measure the shipped artifact, log a child run. Not retried blindly."""
    log = get_run_logger()
    ctx = _context(spec.workload, spec.seed)
    profile, limits = budget.resolve(spec.device, spec.budget)
    run_id = tracking.start_child(parent_run_id, experiment_id, recipe.name)
    try:
        with threads(max(1, (os.cpu_count() or 1) // spec.workers)):  # workers x threads <= cores
            result, packed = pipeline.run_variant(ctx, recipe, profile, limits, baseline_quality)
        result = _track(ctx, run_id, result, packed)
    except BaseException:
        tracking.finish(run_id, "FAILED")
        raise
    log.info("%s: %s", recipe.name, "skipped: " + result.skipped if result.skipped else
             f"quality {result.report.quality:.4f}, {result.report.size_bytes} B, fits={result.fits}")
    return result
