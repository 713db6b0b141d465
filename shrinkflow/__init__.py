"""shrinkflow core: compress a PyTorch model to fit an edge device. Pure PyTorch (+ numpy, sklearn).

    prune_(model, PruneSpec(method="l1-structured", ratio=0.5), example_inputs)
    student = distill(student, teacher_outputs, train, DistillSpec(temperature=4.0, alpha=0.7), validate)
    qmodel = quantize(model, QuantSpec(scheme="int8-dynamic", layers="linear"), example_inputs)
    report = measure(model, example_inputs, threads_=4)
    verdict = budget.check(report, quality, baseline_quality, device("rpi4").budget)
"""

from shrinkflow import budget
from shrinkflow.budget import DEVICES, device
from shrinkflow.distill import distill, kd_loss, teacher_outputs
from shrinkflow.errors import ArtifactError, PromotionError, ShrinkflowError, SpecError, UnsupportedModelError
from shrinkflow.measure import measure
from shrinkflow.prune import prune_
from shrinkflow.quantize import quantize
from shrinkflow.select import select
from shrinkflow.specs import Budget, DistillSpec, FinetuneSpec, PruneSpec, QuantSpec, Recipe, SweepSpec

__all__ = [
    "DEVICES", "ArtifactError", "Budget", "DistillSpec", "FinetuneSpec", "PromotionError", "PruneSpec", "QuantSpec",
    "Recipe", "ShrinkflowError", "SpecError", "SweepSpec", "UnsupportedModelError", "budget", "device", "distill",
    "kd_loss", "measure", "prune_", "quantize", "select", "teacher_outputs",
]
__version__ = "0.1.0"
