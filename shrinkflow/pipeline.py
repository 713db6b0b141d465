"""Run recipes: build a variant step by step, measure it, judge it against the budget.

``run_variant`` is the unit a worker executes; ``sweep`` is the plain in-process loop over a
whole spec (used by the benchmark and as the reference for the orchestrated flow).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shrinkflow import artifact, auto, budget as budget_mod
from shrinkflow.budget import MB, DeviceProfile
from shrinkflow.cache import BlobCache
from shrinkflow.distill import TeacherOutputs, distill, feature_loss, kd_loss, teacher_outputs
from shrinkflow.errors import SpecError
from shrinkflow.measure import count_macs, measure
from shrinkflow.prune import prune_
from shrinkflow.quantize import quantize
from shrinkflow.select import select
from shrinkflow.specs import Budget, FinetuneSpec, Recipe, SweepResult, SweepSpec, VariantResult
from shrinkflow.train import TrainConfig, fit
from shrinkflow.workloads import Workload

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What every step of every variant reads: the workload and the cached teacher outputs."""

    workload: Workload
    teacher_out: TeacherOutputs
    seed: int = 0

    def validate(self, model: nn.Module) -> float:
        return self.workload.quality(model.eval(), self.workload.val)


def context(workload: Workload, cache: BlobCache | Path | None, seed: int = 0) -> Context:
    return Context(workload, teacher_outputs(workload.teacher, workload.train.tensors[0], cache), seed)


def _finetune(ctx: Context, model: nn.Module, spec: FinetuneSpec) -> None:
    wl = ctx.workload
    x, *labels = wl.train.tensors
    data = torch.utils.data.TensorDataset(x, *labels, ctx.teacher_out.outputs)
    if wl.task == "classification":
        def loss_fn(out, t):
            return kd_loss(out, t[-1], t[0], spec.temperature, spec.kd_alpha) if spec.kd_alpha else \
                torch.nn.functional.cross_entropy(out, t[0])
    else:
        def loss_fn(out, t):
            return feature_loss(out, t[-1], "cosine")
    cfg = TrainConfig(epochs=spec.epochs, lr=spec.lr, scheduler=spec.scheduler, patience=spec.patience,
                      samples_per_epoch=spec.samples_per_epoch)
    fit(model, data, loss_fn, cfg, ctx.validate, seed=ctx.seed)


def _step_distill(ctx: Context, model: nn.Module, spec) -> nn.Module:
    wl = ctx.workload
    if wl.make_student is None:
        raise SpecError(f"Workload {wl.name!r} has no student factory; expected one for a 'distill' step.")
    if spec.loss == "kd" and wl.task != "classification":
        raise SpecError(f"DistillSpec.loss='kd' needs a classifier; workload {wl.name!r} is an {wl.task!r} workload, expected loss 'mse' or 'cosine'.")
    torch.manual_seed(ctx.seed)
    return distill(wl.make_student(spec.width, spec.depth), ctx.teacher_out.outputs, wl.train, spec, ctx.validate, ctx.seed)


def _step_prune(ctx: Context, model: nn.Module, spec) -> nn.Module:
    wl = ctx.workload
    heads = wl.num_heads(model) if wl.num_heads else None
    ignored = wl.prune_ignored(model) if wl.prune_ignored else None
    prune_(model, spec, wl.example_inputs, finetune=lambda m, ft: _finetune(ctx, m, ft), num_heads=heads, ignored=ignored)
    return model


def _step_vocab(ctx: Context, model: nn.Module, spec) -> nn.Module:
    wl = ctx.workload
    if wl.shrink_vocab is None:
        raise SpecError(f"Workload {wl.name!r} has no vocabulary to shrink; expected a token-input workload for a 'vocab' step.")
    return wl.shrink_vocab(model, spec)


def _step_finetune(ctx: Context, model: nn.Module, spec) -> nn.Module:
    _finetune(ctx, model, spec)
    return model


def _step_quantize(ctx: Context, model: nn.Module, spec) -> nn.Module:
    return quantize(model, spec, ctx.workload.example_inputs, ctx.workload.calibration)


STEPS: dict[str, Callable[[Context, nn.Module, object], nn.Module]] = {
    "distill": _step_distill,
    "prune": _step_prune,
    "finetune": _step_finetune,
    "quantize": _step_quantize,
    "vocab": _step_vocab,
}


def build(ctx: Context, recipe: Recipe) -> tuple[nn.Module, int]:
    """Apply the recipe's steps to a copy of the teacher. Returns the model and its float MACs."""
    torch.manual_seed(ctx.seed)
    model, macs = copy.deepcopy(ctx.workload.teacher).eval(), None
    for step in recipe.steps:
        if step.kind == "quantize" and macs is None:
            macs = count_macs(model, ctx.workload.example_inputs)
        model = STEPS[step.kind](ctx, model, step)
    model.eval()
    return model, macs if macs is not None else count_macs(model, ctx.workload.example_inputs)


def min_size_bytes(ctx: Context, recipe: Recipe) -> int:
    """A lower bound on the shipped size, computable before any training."""
    model = ctx.workload.teacher
    params = sum(p.numel() for p in model.parameters())
    bytes_per = 4.0
    for step in recipe.steps:
        if step.kind == "distill" and ctx.workload.make_student is not None:
            params = sum(p.numel() for p in ctx.workload.make_student(step.width, step.depth).parameters())
        elif step.kind == "prune":
            keep = 1.0 - step.ratio
            params = int(params * (keep * keep if step.method.endswith("structured") else keep))
        elif step.kind == "vocab":  # at best, every row of the largest table goes
            params -= max((m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)), default=0)
        elif step.kind == "quantize":
            bytes_per = min(bytes_per, 0.5 if step.scheme.startswith("int4") else 1.0 if step.scheme.startswith("int8") else 2.0)
    return int(params * bytes_per * 0.5)  # 0.5: room for what entropy coding can still save


def run_variant(ctx: Context, recipe: Recipe, profile: DeviceProfile, limits: Budget,
                baseline_quality: float | None, max_threads: int | None = None) -> tuple[VariantResult, artifact.Packed | None]:
    """Build, pack, measure and judge one recipe. Skips it if it cannot fit the size limit."""
    t0 = time.perf_counter()
    if reason := auto.not_applicable(ctx.workload.teacher, recipe):
        return VariantResult(name=recipe.name, recipe=recipe, skipped=reason), None
    if limits.max_size_mb is not None and (floor := min_size_bytes(ctx, recipe)) > limits.max_size_mb * MB:
        reason = f"needs >= {floor / MB:.3f} MB before training > max_size_mb {limits.max_size_mb}"
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
