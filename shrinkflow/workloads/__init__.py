"""Workloads: a teacher, its data splits, its quality metric and a student factory.

Built-in workloads are looked up by name; anything else is a factory given by import path,
``package.module:function``, called as ``function(seed=...)`` and returning a :class:`Workload`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow.errors import SpecError
from shrinkflow.specs import Recipe, VocabSpec

Quality = Callable[[nn.Module, TensorDataset], float]
Metrics = Callable[[nn.Module, TensorDataset], dict[str, float]]
_OOD_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


@dataclass
class Workload:
    """Everything a sweep needs to know about one model and its data.

    ``train``/``val``/``test`` hold (inputs, labels) for classifiers or (inputs,) for encoders;
    ``quality(model, split)`` returns a score where higher is better.

    Optional hooks: ``extra_metrics(model, split)`` more named scores, recorded in
    ``Report.extra``; ``assets(model)`` the files (name -> bytes) that ship next to a variant's
    program to turn raw input into model input (a tokenizer, say), carried by ``Packed.assets``;
    ``shrink_vocab(model, spec)`` the ``vocab`` step; ``prune_ignored(model)`` layers structured
    pruning must keep whole. ``example`` overrides the example input (first test sample) and
    ``dynamic_dims`` are the input dimensions the exported program leaves free, and ``max_dims``
    bounds some of them (dimension -> largest size) where a runtime plans memory ahead (ExecuTorch).

    ``ood`` holds out-of-domain evaluation sets by name (same layout as ``test``, disjoint from
    every split): each is scored with ``quality`` (and ``extra_metrics``) as the variant ships,
    and the budget's ``max_quality_drop`` applies to the worst of ``test`` and every one of them,
    each drop taken against the teacher on the same set. ``ood_baselines`` gives the teacher's
    quality on a set where it is known without running it (1.0 where quality is similarity to
    the teacher); the others are measured once per workload object (:meth:`ood_baseline`).
    Names are short identifiers (letters, digits, ``_``, ``-``): they become metric names.
    """

    name: str
    teacher: nn.Module
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    quality: Quality
    quality_name: str = "accuracy"
    task: Literal["classification", "embedding"] = "classification"
    make_student: Callable[[float, float], nn.Module] | None = None
    default_recipes: tuple[Recipe, ...] = ()
    num_heads: Callable[[nn.Module], dict[nn.Module, int]] | None = None
    calibration_size: int = 256
    extra: dict = field(default_factory=dict)
    extra_metrics: Metrics | None = None
    assets: Callable[[nn.Module], dict[str, bytes]] | None = None
    shrink_vocab: Callable[[nn.Module, VocabSpec], nn.Module] | None = None
    prune_ignored: Callable[[nn.Module], list[nn.Module]] | None = None
    example: tuple[torch.Tensor, ...] | None = None
    dynamic_dims: tuple[int, ...] = (0,)
    max_dims: dict[int, int] = field(default_factory=dict)
    ood: dict[str, TensorDataset] = field(default_factory=dict)
    ood_baselines: dict[str, float] = field(default_factory=dict)

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.example if self.example is not None else (self.test.tensors[0][:1],)

    def files(self, model: nn.Module) -> dict[str, bytes]:
        """The files shipped with ``model`` (a variant before export), by file name; {} if none."""
        return self.assets(model) if self.assets else {}

    @property
    def calibration(self) -> torch.Tensor:
        return self.train.tensors[0][: self.calibration_size]

    def ood_baseline(self, name: str) -> float:
        """The teacher's quality on OOD set ``name``: ``ood_baselines[name]``, else measured once
        (eager teacher) and kept in ``ood_baselines`` for every later variant of this process."""
        if name not in self.ood_baselines:
            self.ood_baselines[name] = float(self.quality(self.teacher.eval(), self.ood[name]))
        return self.ood_baselines[name]

    def check(self) -> Workload:
        """Validate the pieces a factory returned; raises SpecError naming the bad one."""
        for split in ("train", "val", "test"):
            ds = getattr(self, split)
            if not isinstance(ds, TensorDataset) or len(ds) == 0:
                raise SpecError(f"Workload {self.name!r} field {split!r} is empty or not a TensorDataset; expected a non-empty TensorDataset.")
        for name, ds in self.ood.items():
            if not _OOD_NAME.fullmatch(name) or not isinstance(ds, TensorDataset) or len(ds) == 0:
                raise SpecError(f"Workload {self.name!r} field 'ood' entry {name!r} is not a named, non-empty TensorDataset; "
                                "expected a name of letters, digits, '_' or '-' and a TensorDataset laid out like 'test'.")
        with torch.inference_mode():
            out = self.teacher.eval()(*self.example_inputs)
        if self.task == "classification":
            labels = self.train.tensors[1] if len(self.train.tensors) > 1 else None
            if labels is None or out.ndim != 2 or int(labels.max()) >= out.shape[-1]:
                raise SpecError(
                    f"Workload {self.name!r} teacher outputs shape {tuple(out.shape)} do not match its labels; "
                    "expected (batch, classes) logits covering every label.")
        return self


def home() -> Path:
    """The state directory: $SHRINKFLOW_HOME, else ./.shrinkflow."""
    return Path(os.environ.get("SHRINKFLOW_HOME", ".shrinkflow")).resolve()


def _builtins() -> dict[str, Callable[..., Workload]]:
    from shrinkflow.workloads import digits

    def minilm(**kwargs) -> Workload:
        from shrinkflow.workloads import (
            minilm as module,  # imports transformers: only when asked for
        )

        return module.build(**kwargs)

    return {"digits": digits.build, "minilm": minilm}


def load(ref: str, seed: int = 0, cache=None) -> Workload:
    """A built-in workload by name, or a user factory by ``package.module:function``.

    ``cache`` (a :class:`shrinkflow.cache.BlobCache`) is handed to factories that accept it,
    for weights they train or fetch once.
    """
    if ":" not in ref:
        builtins = _builtins()
        if ref not in builtins:
            raise SpecError(f"Unknown workload {ref!r} for field 'workload'; expected one of {sorted(builtins)} or 'package.module:function'.")
        return builtins[ref](seed=seed, cache=cache).check()
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"Workload factory {ref!r} for field 'workload' cannot be imported ({exc}); expected 'package.module:function'.") from None
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("seed", seed), ("cache", cache)) if k in accepted}
    workload = factory(**kwargs)
    if not isinstance(workload, Workload):
        raise SpecError(f"Workload factory {ref!r} returned {type(workload).__name__!r}; expected shrinkflow.workloads.Workload.")
    return workload.check()


def accuracy(model: nn.Module, split: TensorDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on (inputs, labels)."""
    x, y = split.tensors[:2]
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            correct += int((model(x[start:start + batch_size]).argmax(-1) == y[start:start + batch_size]).sum())
    return correct / len(x)
