"""Workloads: a teacher, its data splits, its quality metric and a student factory.

Built-in workloads are looked up by name; anything else is a factory given by import path,
``package.module:function``, called as ``function(seed=...)`` and returning a :class:`Workload`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow import data
from shrinkflow.errors import SpecError
from shrinkflow.specs import Recipe, VocabSpec

Quality = Callable[[nn.Module, TensorDataset], float]
Metrics = Callable[[nn.Module, TensorDataset], dict[str, float]]
logger = logging.getLogger(__name__)
_OOD_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


@dataclass
class Workload:
    """Everything a sweep needs to know about one model and its data.

    ``train``/``val``/``test`` hold ``(*inputs, labels)`` for classifiers or ``(*inputs,)`` for
    encoders. Each may be a TensorDataset laid out so, or any map-style or iterable Dataset or a
    DataLoader with tuple or dict batches, read once into that layout (:func:`shrinkflow.data.as_split`).
    ``inputs`` is how many leading tensors the model takes (1 by default), or the names it takes
    them by as keywords (dict batches: the keys to read, in that order); ``label`` is a dict
    batch's label key (absent: no labels). ``output`` names the part of a model's output that is
    the prediction when the model does not return a tensor (a Hugging Face ``ModelOutput`` field
    such as ``"logits"``, or a tuple index); left None it is found (``logits`` for classifiers,
    ``sentence_embedding``, ``embeddings`` or ``pooler_output`` for embeddings, a tuple's first).
    Such models, and keyword-input ones, are wrapped (teacher and students) so that every step
    calls ``model(*inputs)`` and gets a tensor: ``quality(model, split)`` does the same and returns a
    score where higher is better.

    Optional hooks: ``extra_metrics(model, split)`` more named scores, recorded in
    ``Report.extra``; ``assets(model)`` the files (name -> bytes) that ship next to a variant's
    program to turn raw input into model input (a tokenizer, say), carried by ``Packed.assets``;
    ``shrink_vocab(model, spec)`` the ``vocab`` step; ``prune_ignored(model)`` layers structured
    pruning must keep whole. ``example`` overrides the example input (first test sample) and
    ``dynamic_dims`` are the input dimensions the exported program leaves free, and ``max_dims``
    bounds some of them (dimension -> largest size) where a runtime plans memory ahead (ExecuTorch).
    ``longest`` is an input at the longest length users send (a sequence model's maximum length):
    every variant is also timed on it (``Report.extra["latency_p50_ms_longest"]``, reported, not
    judged: the limit is on the typical call, the example) and its peak memory is taken on it.

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
    longest: tuple[torch.Tensor, ...] | None = None
    dynamic_dims: tuple[int, ...] = (0,)
    max_dims: dict[int, int] = field(default_factory=dict)
    ood: dict[str, TensorDataset] = field(default_factory=dict)
    ood_baselines: dict[str, float] = field(default_factory=dict)
    inputs: data.Inputs = 1
    label: str = "labels"
    output: str | int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.inputs, int) and self.inputs >= 1) and not (
                isinstance(self.inputs, tuple) and self.inputs and all(isinstance(n, str) for n in self.inputs)):
            raise SpecError(f"Workload {self.name!r} field 'inputs' is {self.inputs!r}; expected a count >= 1 or a "
                            "tuple of the keyword names the model takes.")
        for split in ("train", "val", "test"):
            setattr(self, split, data.as_split(getattr(self, split), self.inputs, self.label, f"Workload {self.name!r} field {split!r}"))
        self.ood = {name: data.as_split(ds, self.inputs, self.label, f"Workload {self.name!r} field 'ood' entry {name!r}")
                    for name, ds in self.ood.items()}
        self._wrap()
        if self.output is None:  # a Hugging Face output object: found here, so the core API needs no check() first
            try:
                self._resolve_output()
            except Exception:  # noqa: BLE001 - check() reports a teacher that fails on its example, naming the field
                pass

    def _wrap(self) -> None:
        """Teacher and students as ``model(*inputs) -> Tensor`` (see the class docstring)."""
        self.teacher = data.wrap(self.teacher, self.inputs, self.output)
        if isinstance(self.make_student, data.Students):
            self.make_student.output = self.output
        elif self.make_student is not None and not (isinstance(self.inputs, int) and self.output is None):
            self.make_student = data.Students(self.make_student, self.inputs, self.output)

    @property
    def n_inputs(self) -> int:
        """How many leading tensors of each split the model takes."""
        return data.input_count(self.inputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        """What a shipped program's inputs are called (its manifest, its registered signature): the
        keyword names the model takes, else its teacher's ``forward`` parameters (input_0, ... if
        it takes ``*args``), the same for every variant whatever wrapper a step put around it."""
        from shrinkflow.export import input_names

        return self.inputs if isinstance(self.inputs, tuple) else tuple(input_names(self.teacher, self.n_inputs))

    def labels(self, split: TensorDataset) -> torch.Tensor | None:
        """The labels of ``split`` (the tensor after the inputs), None if it has none."""
        return split.tensors[self.n_inputs] if len(split.tensors) > self.n_inputs else None

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.example if self.example is not None else tuple(t[:1] for t in self.test.tensors[:self.n_inputs])

    def files(self, model: nn.Module) -> dict[str, bytes]:
        """The files shipped with ``model`` (a variant before export), by file name; {} if none."""
        return self.assets(model) if self.assets else {}

    @property
    def calibration(self) -> tuple[torch.Tensor, ...]:
        """The first ``calibration_size`` training inputs (static quantization's observers run on them)."""
        return tuple(t[: self.calibration_size] for t in self.train.tensors[:self.n_inputs])

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
        out = self._teacher_output()
        if self.task == "classification":
            splits = {"train": self.train, "val": self.val, "test": self.test, **{f"ood[{n!r}]": d for n, d in self.ood.items()}}
            for split, ds in splits.items():
                labels = self.labels(ds)
                if labels is None or out.ndim != 2 or int(labels.max()) >= out.shape[-1] or int(labels.min()) < 0:
                    raise SpecError(
                        f"Workload {self.name!r} teacher outputs shape {tuple(out.shape)} do not match its labels in field "
                        f"{split!r} ({'none' if labels is None else f'{int(labels.min())}..{int(labels.max())}'}, the tensor "
                        f"after the {self.n_inputs} input(s); dict batches: the key the Workload field 'label' names, "
                        f"{self.label!r}); expected (batch, classes) logits covering every label.")
        return self

    def check_quality(self) -> Workload:
        """The quality function on the teacher and the first samples of ``val``: it must return a
        number (:func:`load` runs this after :meth:`check`, before any sweep uses the workload)."""
        head = TensorDataset(*(t[:64] for t in self.val.tensors))
        try:
            score = self.quality(self.teacher.eval(), head)
            float(score)
        except Exception as exc:  # noqa: BLE001 - a user's function: any failure is the same bad input
            raise SpecError(f"Workload {self.name!r} field 'quality' fails on the teacher and 64 samples of 'val' "
                            f"({type(exc).__name__}: {exc}); expected quality(model, split) to return a number.") from None
        return self

    def _resolve_output(self):
        """The teacher's output on the example; a non-tensor one picks ``output`` and wraps the models."""
        with torch.inference_mode():
            out = self.teacher.eval()(*self.example_inputs)
        if isinstance(out, torch.Tensor):
            return out
        self.output = data.choose_output(out, self.task)
        logger.info("workload %s: the prediction is the model output's %r", self.name, self.output)
        self._wrap()
        with torch.inference_mode():
            return self.teacher.eval()(*self.example_inputs)

    def _teacher_output(self) -> torch.Tensor:
        """The teacher on the example (see :meth:`_resolve_output`), or a SpecError naming 'inputs'."""
        try:
            return self._resolve_output()
        except (TypeError, RuntimeError, ValueError, IndexError) as exc:
            shapes = [tuple(t.shape) for t in self.example_inputs]
            raise SpecError(f"Workload {self.name!r} teacher fails on the example inputs {shapes} ({exc}); expected it "
                            f"to take the first {self.n_inputs} tensor(s) of each split (Workload field 'inputs').") from None


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


def load(ref: str, seed: int = 0, cache=None, task: str | None = None, data: str | None = None,
         max_length: int | None = None) -> Workload:
    """A built-in workload by name, a Hugging Face model directory by ``hf:PATH`` (with ``task``
    and ``data``: :mod:`shrinkflow.workloads.hf`), or a user factory by ``package.module:function``.

    ``cache`` (a :class:`shrinkflow.cache.BlobCache`) is handed to factories that accept it,
    for weights they train or fetch once; ``max_length`` (tokens per text) to those that accept it.
    """
    if ref.startswith("hf:"):
        from shrinkflow.workloads import hf  # imports transformers: only when asked for

        return hf.build(ref[3:], task, data, seed=seed, cache=cache, max_length=max_length).check().check_quality()
    if task is not None or data is not None:
        raise SpecError(f"SweepSpec.task / SweepSpec.data are set for workload {ref!r}; expected them only with an 'hf:PATH' workload.")
    if ":" not in ref:
        builtins = _builtins()
        if ref not in builtins:
            raise SpecError(f"Unknown workload {ref!r} for field 'workload'; expected one of {sorted(builtins)} or 'package.module:function'.")
        if max_length is not None and ref != "minilm":
            raise SpecError(f"SweepSpec.max_length={max_length} for workload {ref!r}; expected it only for minilm, hf:PATH "
                            "or a factory that takes max_length.")
        extra = {"max_length": max_length} if max_length is not None else {}
        return builtins[ref](seed=seed, cache=cache, **extra).check().check_quality()
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"Workload factory {ref!r} for field 'workload' cannot be imported ({exc}); expected 'package.module:function'.") from None
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("seed", seed), ("cache", cache)) if k in accepted}
    if max_length is not None:
        if "max_length" not in accepted:
            raise SpecError(f"SweepSpec.max_length={max_length} for workload {ref!r}, whose factory takes no 'max_length'; "
                            "expected it only for workloads that tokenize text.")
        kwargs["max_length"] = max_length
    workload = factory(**kwargs)
    if not isinstance(workload, Workload):
        raise SpecError(f"Workload factory {ref!r} returned {type(workload).__name__!r}; expected shrinkflow.workloads.Workload.")
    return workload.check().check_quality()


def accuracy(model: nn.Module, split: TensorDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on ``(*inputs, labels)``: the last tensor is the labels."""
    *xs, y = split.tensors
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(y), batch_size):
            out = model(*(x[start:start + batch_size] for x in xs))
            correct += int((out.argmax(-1) == y[start:start + batch_size]).sum())
    return correct / len(y)
