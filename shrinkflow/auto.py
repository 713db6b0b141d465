"""A default sweep derived from the model itself, for workloads that bring no recipes.

A user who gives a model, data and a device, and no recipes, must not get an empty sweep. The
recipes here come from the teacher's layer census (which layer kinds hold its parameters) and
from the budget (how far the size must come down), not from a per-workload list:

- quantization schemes that act on the layer kinds the model has (Linear -> int8 dynamic and
  weight-only, Conv -> static int8 with calibration, RNN/GRU/LSTM and Embedding -> int8
  weight-only, Linear or Conv -> fp16), each only where those
  layers hold at least ``MIN_SHARE`` of the parameters;
- unstructured magnitude pruning with fine-tuning, and structured channel pruning where the
  model has prunable conv or hidden Linear layers;
- distillation into half- and quarter-width students where the workload can build students,
  chained with the quantization that fits the student; for a transformer (layers with
  query/key/value projections) with hidden-state and attention-relation terms, and without a
  student factory into half of the teacher's own layers (``init: parent``);
- when the budget's size limit is below a quarter of the teacher's fp32 weights, the chains
  that can reach it come first.

:func:`not_applicable` says why a quantize step would act on (almost) nothing in a model, so the
sweep records "not applicable: ..." instead of training and shipping an unchanged model.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from shrinkflow.budget import MB
from shrinkflow.layerwise import TERMS, find_blocks
from shrinkflow.specs import (
    Budget,
    DistillSpec,
    FinetuneSpec,
    PruneSpec,
    QuantSpec,
    Recipe,
)
from shrinkflow.steps import STEPS

logger = logging.getLogger(__name__)

#: A step that acts on less than this share of the model's parameters is not worth a variant.
MIN_SHARE = 0.01

_KINDS: tuple[tuple[str, tuple[type[nn.Module], ...]], ...] = (
    ("linear", (nn.Linear,)),
    ("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
    ("embedding", (nn.Embedding, nn.EmbeddingBag)),
    ("rnn", (nn.RNNBase,)),
)


def census(model: nn.Module) -> dict[str, float]:
    """Share of the model's parameters held by each layer kind (linear, conv, embedding, rnn, other)."""
    counts: Counter[str] = Counter()
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            counts[next((k for k, types in _KINDS if isinstance(module, types)), "other")] += own
    total = sum(counts.values()) or 1
    return {kind: n / total for kind, n in counts.items()}


def not_applicable(model: nn.Module, recipe: Recipe) -> str | None:
    """Why ``recipe`` would leave ``model`` (almost) unchanged, or None if every step acts on it.

    Only quantize steps applied to the teacher itself are judged: after a distill or prune the
    model is another one, and those steps always act.
    """
    if any(step.kind != "quantize" for step in recipe.steps):
        return None
    for step in recipe.steps:
        share = STEPS[step.kind].share(model, step)
        if share < MIN_SHARE:
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in sorted(census(model).items(), key=lambda kv: -kv[1]))
            return (f"not applicable: {step.scheme} (layers={step.layers}) acts on {share:.1%} of the parameters "
                    f"(under {MIN_SHARE:.0%}); the model's parameters are {kinds}")
    return None


def _quant_for(shares: dict[str, float]) -> list[QuantSpec]:
    out = []
    if shares.get("linear", 0) >= MIN_SHARE:
        out += [QuantSpec(scheme="int8-dynamic", layers="linear"), QuantSpec(scheme="int8-weight-only", layers="linear")]
    if shares.get("conv", 0) >= MIN_SHARE:
        out.append(QuantSpec(scheme="int8-static"))
    if shares.get("rnn", 0) >= MIN_SHARE:
        out.append(QuantSpec(scheme="int8-weight-only", layers="rnn"))
    if shares.get("embedding", 0) >= MIN_SHARE:
        out.append(QuantSpec(scheme="int8-weight-only", layers="embedding"))
    if shares.get("linear", 0) + shares.get("conv", 0) >= MIN_SHARE:
        out.append(QuantSpec(scheme="fp16"))
    return out


def _name(q: QuantSpec) -> str:
    return q.scheme if q.layers in ("all", "linear") else f"{q.scheme}-{q.layers}"


def default_recipes(teacher: nn.Module, task: str, can_distill: bool, limits: Budget) -> tuple[Recipe, ...]:
    """Recipes for a model that came with none: see the module docstring."""
    shares = census(teacher)
    quants = _quant_for(shares)
    prunable = shares.get("conv", 0) + shares.get("linear", 0) >= MIN_SHARE
    ft = FinetuneSpec(epochs=4, scheduler="cosine", kd_alpha=0.5 if task == "classification" else 1.0)
    recipes = [Recipe(name=_name(q), steps=(q,)) for q in quants]
    # The chains take the int8 scheme that acts on the largest share of the parameters (on a CNN,
    # static int8 of the convolutions, not dynamic int8 of a classifier head).
    int8 = [q for q in quants if q.scheme.startswith("int8")] or quants
    best_q = max(int8, key=lambda q: STEPS["quantize"].share(teacher, q), default=None)
    if prunable:
        recipes.append(Recipe(name="prune-global-50", steps=(PruneSpec(method="magnitude-global", ratio=0.5, finetune=ft),)))
        recipes.append(Recipe(name="prune-channels-30", steps=(PruneSpec(method="l1-structured", ratio=0.3, finetune=ft),)))
        if best_q is not None:
            recipes.append(Recipe(name=f"prune-global-50+{_name(best_q)}",
                                  steps=(PruneSpec(method="magnitude-global", ratio=0.5, finetune=ft), best_q)))
    loss = "kd" if task == "classification" else "cosine"
    # A transformer learns from the teacher's layers too (hidden states and attention relations).
    layers = TERMS if find_blocks(teacher) is not None else {}
    if can_distill:
        for width in (0.5, 0.25):
            kd = DistillSpec(width=width, loss=loss, epochs=30, **layers)
            recipes.append(Recipe(name=f"kd-w{int(width * 100)}", steps=(kd,)))
            if best_q is not None:
                recipes.append(Recipe(name=f"kd-w{int(width * 100)}+{_name(best_q)}", steps=(kd, best_q)))
    elif layers and len(find_blocks(teacher)) > 1:  # no student factory: half of the teacher's own layers
        kd = DistillSpec(init="parent", depth=0.5, loss=loss, epochs=30, **layers)
        recipes.append(Recipe(name="kd-layers-d50", steps=(kd,)))
        if best_q is not None:
            recipes.append(Recipe(name=f"kd-layers-d50+{_name(best_q)}", steps=(kd, best_q)))
    if limits.max_size_mb is not None:
        fp32_mb = sum(p.numel() for p in teacher.parameters()) * 4 / MB
        if limits.max_size_mb < fp32_mb / 4:  # only chains can get there: try them first
            recipes.sort(key=lambda r: -len(r.steps))
    logger.info("no recipes given: %d derived from the model's layers (%s)", len(recipes),
                ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items())))
    return tuple(recipes)
