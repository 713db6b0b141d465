"""Pruning by importance, done once per iteration (never inside forward), then made permanent.

* ``magnitude-global`` / ``magnitude-layer``: unstructured L1 pruning of Conv/Linear weights,
  ranked over the whole model or within each layer. Masks stay on during fine-tuning so pruned
  weights stay zero, and are folded into the weights at the end (no masks left behind).
* ``l1-structured`` / ``l2-structured``: channel, neuron and attention-head pruning through
  Torch-Pruning's dependency graph, which removes them physically: fewer parameters, a smaller
  file and less compute. Attention modules of Hugging Face models are found without hooks
  (:func:`attention_heads`) and lose whole heads, never part of one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.utils.prune as tprune
from torch import nn

from shrinkflow.errors import UnsupportedModelError
from shrinkflow.specs import FinetuneSpec, PruneSpec

logger = logging.getLogger(__name__)

Finetune = Callable[[nn.Module, FinetuneSpec], None]
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class PruneResult:
    params_before: int
    params_after: int
    sparsity: float  # fraction of zero weights in the pruned layers


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _PRUNABLE)]


def default_ignored(model: nn.Module) -> list[nn.Module]:
    """The output layer: its units are the model's outputs, so they are never removed."""
    layers = _weight_layers(model)
    return layers[-1:] if layers else []


#: (query, key, value) child names of the attention modules of Hugging Face transformers families.
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))


def _head_size(module: nn.Module) -> int | None:
    size = getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
    return size if isinstance(size, int) and size > 0 else None


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """The q, k and v projections of every attention module found, with their head counts.

    Found without user hooks: a module with an ``attention_head_size`` (or ``head_dim``) and
    Linear children named query/key/value (BERT family), q_proj/k_proj/v_proj, or q_lin/k_lin/
    v_lin, whose widths are whole multiples of it. Grouped-query attention (fewer k/v heads than
    q heads) is left out: its heads cannot be removed one for one.
    """
    found: dict[nn.Module, int] = {}
    for module in model.modules():
        size = _head_size(module)
        for names in _QKV_NAMES if size else ():
            projs = [getattr(module, n, None) for n in names]
            if all(isinstance(p, nn.Linear) for p in projs):
                widths = {p.out_features for p in projs}
                if len(widths) == 1 and (width := widths.pop()) % size == 0:
                    found.update({p: width // size for p in projs})
    return found


def _sync_head_counts(model: nn.Module) -> None:
    """After whole heads went: attention modules' head counts follow their projections' widths."""
    for module in model.modules():
        size = _head_size(module)
        for names in _QKV_NAMES if size else ():
            query = getattr(module, names[0], None)
            if isinstance(query, nn.Linear):
                for attr, value in (("num_attention_heads", query.out_features // size), ("num_heads", query.out_features // size),
                                    ("all_head_size", query.out_features)):
                    if isinstance(getattr(module, attr, None), int):
                        setattr(module, attr, value)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _zero_fraction(layers: Sequence[nn.Module]) -> float:
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / total if total else 0.0


def _step_amount(ratio: float, i: int, n: int) -> float:
    """Fraction of the still-unpruned weights to remove at iteration i (1-based) of n."""
    before, after = ratio * (i - 1) / n, ratio * i / n
    return (after - before) / (1.0 - before)


def _unstructured(model: nn.Module, spec: PruneSpec, finetune: Finetune | None) -> None:
    layers = _weight_layers(model)
    if not layers:
        raise UnsupportedModelError(f"Model {type(model).__name__!r} has no Conv/Linear weights; expected at least one to prune.")
    orders = [[n for n, _ in m.named_parameters(recurse=False)] for m in layers]
    for i in range(1, spec.iterations + 1):
        amount = _step_amount(spec.ratio, i, spec.iterations)
        if spec.method == "magnitude-global":
            tprune.global_unstructured([(m, "weight") for m in layers], pruning_method=tprune.L1Unstructured, amount=amount)
        else:
            for m in layers:
                tprune.l1_unstructured(m, "weight", amount=amount)
        if finetune is not None:
            finetune(model, spec.finetune)
    for m, names in zip(layers, orders, strict=True):
        tprune.remove(m, "weight")  # fold the mask into the weight: permanent zeros, no hooks
        for name in names:  # remove() re-adds `weight` last; restore the order, so the state dict and
            param = getattr(m, name)  # the exported program are the same bytes as a model loaded from it
            delattr(m, name)
            m.register_parameter(name, param)


def _structured(model: nn.Module, spec: PruneSpec, example_inputs: tuple, finetune: Finetune | None,
                ignored: Sequence[nn.Module], num_heads: dict[nn.Module, int] | None) -> None:
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=tp.importance.MagnitudeImportance(p=1 if spec.method == "l1-structured" else 2),
        pruning_ratio=spec.ratio,
        iterative_steps=spec.iterations,
        ignored_layers=list(ignored),
        num_heads=num_heads or {},
        prune_num_heads=bool(num_heads),
        head_pruning_ratio=spec.ratio if num_heads else 0.0,
        prune_head_dims=not num_heads,  # with heads given: remove whole heads, keep head size
    )
    for _ in range(spec.iterations):
        pruner.step()
        _sync_head_counts(model)
        if finetune is not None:
            finetune(model, spec.finetune)


def prune_(model: nn.Module, spec: PruneSpec, example_inputs: tuple[torch.Tensor, ...], *,
           finetune: Finetune | None = None, ignored: Sequence[nn.Module] | None = None,
           num_heads: dict[nn.Module, int] | None = None) -> PruneResult:
    """Prune ``model`` in place as ``spec`` says, fine-tuning after each iteration."""
    before = _params(model)
    model.eval()
    if spec.method in ("magnitude-global", "magnitude-layer"):
        _unstructured(model, spec, finetune)
    else:
        # The output layer is always kept whole; a caller's list adds to it, never replaces it.
        ignored = list({id(m): m for m in (*default_ignored(model), *(ignored or ()))}.values())
        num_heads = attention_heads(model) if num_heads is None else num_heads
        _structured(model, spec, example_inputs, finetune, ignored, num_heads)
    result = PruneResult(before, _params(model), _zero_fraction(_weight_layers(model)))
    logger.info("pruned %s: params %d -> %d, sparsity %.3f", spec.method, before, result.params_after, result.sparsity)
    return result
