"""Steps: one registered class per step kind, and the content-addressed cache of what they build.

A step class owns everything about its kind: how it is applied to a model, how to rebuild the
architecture it leaves (so a cached state dict can be loaded into it), which share of a model it
acts on, its size floor and training cost before anything runs, and the workload capabilities it
needs. ``STEPS`` maps the spec's ``kind`` to its handler; adding a step kind is one class here
plus its spec in ``specs.py``.

Every intermediate model after a training step (distill, prune, finetune, vocab) is stored
content-addressed, keyed by (parent key, step spec, seed, library versions that change results),
like Olive's pass cache. The root key is the teacher-outputs key (teacher weights and data). A
recipe's prefix that any sweep computed before is loaded, checked by sha256, never trained again.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from shrinkflow.cache import BlobCache, DirCache, dumps, loads
from shrinkflow.data import Call
from shrinkflow.distill import (
    TeacherOutputs,
    content_hash,
    distill,
    feature_loss,
    kd_loss,
    teacher_outputs,
)
from shrinkflow.errors import ArtifactError, SpecError
from shrinkflow.layerwise import (
    blocks_of,
    build_objective,
    find_blocks,
    important_layers,
    layer_map,
    relation_heads,
    shallower,
)
from shrinkflow.prune import prune_
from shrinkflow.quantize import SCHEMES, quantize, selected_layers
from shrinkflow.specs import (
    DistillSpec,
    FinetuneSpec,
    PruneSpec,
    QuantSpec,
    Recipe,
    VocabSpec,
)
from shrinkflow.train import TrainConfig, fit
from shrinkflow.workloads import Workload

logger = logging.getLogger(__name__)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


#: What changes the result of a training step besides its inputs: bump "steps" when a step's
#: code changes what it computes.
VERSIONS = {"torch": torch.__version__, "torch-pruning": _version("torch-pruning"), "steps": "2"}


#: Validation samples that rank a model's layers for ``DistillSpec.layers: important``.
IMPORTANCE_SAMPLES = 256

#: While a search trial trains (tasks/search.py): called with (the training step, a validation
#: score) after each epoch; it raises to stop the trial. None outside a search.
MONITOR: ContextVar[Callable[[TrainingStep, float], None] | None] = ContextVar("monitor", default=None)


@dataclass(frozen=True)
class TrainingStep:
    """Which step of a chain is training: its position, its kind and its maximum epochs."""

    index: int
    kind: str
    epochs: int


#: The step :func:`materialize` is applying (what the monitor is told a score belongs to).
TRAINING: ContextVar[TrainingStep | None] = ContextVar("training", default=None)
#: The validation scores of the training step being computed, in order (stored beside its prefix).
CURVE: ContextVar[list[float] | None] = ContextVar("curve", default=None)


@dataclass
class Context:
    """What every step of every variant reads: the workload, the cached teacher outputs, the
    seed, and the cache that intermediate models are stored in (None: nothing is stored)."""

    workload: Workload
    teacher_key: str
    seed: int = 0
    cache: BlobCache | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"computed": 0, "reused": 0})
    _teacher_out: TeacherOutputs | None = field(default=None, repr=False)

    def validate(self, model: nn.Module) -> float:
        """Validation quality; while a search trial trains, each score also goes to its monitor."""
        score = self.workload.quality(model.eval(), self.workload.val)
        if (curve := CURVE.get()) is not None:
            curve.append(float(score))
        if (monitor := MONITOR.get()) is not None:
            monitor(TRAINING.get(), score)
        return score

    @property
    def teacher_out(self) -> TeacherOutputs:
        """The teacher's outputs on the training inputs, computed (or read from the cache) on
        first use: a sweep whose steps train nothing never runs the teacher over its data."""
        if self._teacher_out is None:
            self._teacher_out = teacher_outputs(self.workload.teacher, self.workload.train.tensors[:self.workload.n_inputs], self.cache,
                                                key=self.teacher_key)
        return self._teacher_out

    @property
    def forward_samples(self) -> int:
        """Samples the teacher ran on in this context (0: read from the cache, or never needed)."""
        return self._teacher_out.forward_samples if self._teacher_out is not None else 0


def context(workload: Workload, cache: BlobCache | Path | None, seed: int = 0) -> Context:
    cache = DirCache(cache) if isinstance(cache, Path) else cache
    return Context(workload, content_hash(workload.teacher, workload.train.tensors[:workload.n_inputs]), seed, cache)


def needs_teacher_outputs(recipes) -> bool:
    """Whether any step of ``recipes`` trains against the teacher's outputs."""
    return any(STEPS[step.kind].uses_teacher(step) for recipe in recipes for step in recipe.steps)


class Step(abc.ABC):
    """A step kind. Subclasses set ``kind`` and ``spec``, implement ``apply``, and override what differs."""

    kind: ClassVar[str]
    spec: ClassVar[type]
    #: Whether its result is stored in the prefix cache (it trained something worth keeping).
    cached: ClassVar[bool] = True
    #: Workload attributes it needs (checked before the teacher runs).
    needs: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def apply(self, ctx: Context, model: nn.Module, spec) -> nn.Module:
        """The step itself: returns the new model (``model`` may be changed in place)."""

    def restructure(self, ctx: Context, model: nn.Module, spec) -> nn.Module:
        """The architecture ``apply`` leaves, without training: a cached state dict loads into it."""
        return model

    def size_floor(self, ctx: Context, params: int, bytes_per: float, spec) -> tuple[int, float]:
        """(parameters, bytes per parameter) at best after this step, before any training."""
        return params, bytes_per

    def cost(self, spec, width: float) -> tuple[float, float]:
        """(training epochs weighted by the width trained, the width after this step)."""
        return 0.0, width

    def epochs(self, spec) -> int:
        """The most epochs it trains for, whatever the width (each costs a training loop's fixed part)."""
        return 0

    def share(self, model: nn.Module, spec) -> float:
        """The share of ``model``'s parameters this step acts on."""
        return 1.0

    def lacks(self, workload: Workload, spec) -> str | None:
        """The workload attribute it needs and ``workload`` lacks (None: it has all)."""
        return next((need for need in self.needs if getattr(workload, need, None) is None), None)

    def check(self, workload: Workload, spec) -> None:
        """Raise SpecError, naming the field, if ``spec`` cannot apply to ``workload``'s model
        (checked before the teacher runs)."""

    def uses_teacher(self, spec) -> bool:
        """Whether applying it reads the teacher's outputs on the training data."""
        return False

    def label(self, spec) -> str:
        """A short name for the step, for task runs in the Prefect UI."""
        return self.kind


STEPS: dict[str, Step] = {}


def register(cls: type[Step]) -> type[Step]:
    STEPS[cls.kind] = cls()
    return cls


def _finetune(ctx: Context, model: nn.Module, spec: FinetuneSpec) -> None:
    if spec.epochs == 0:
        return
    wl = ctx.workload
    data = torch.utils.data.TensorDataset(*wl.train.tensors, ctx.teacher_out.outputs)
    if wl.task == "classification":
        def loss_fn(out, t):
            return kd_loss(out, t[-1], t[0], spec.temperature, spec.kd_alpha) if spec.kd_alpha else \
                torch.nn.functional.cross_entropy(out, t[0])
    else:
        def loss_fn(out, t):
            return feature_loss(out, t[-1], "cosine")
    cfg = TrainConfig(epochs=spec.epochs, lr=spec.lr, scheduler=spec.scheduler, patience=spec.patience,
                      samples_per_epoch=spec.samples_per_epoch)
    fit(model, data, loss_fn, cfg, ctx.validate, seed=ctx.seed, inputs=wl.n_inputs)


@register
class Distill(Step):
    kind, spec = "distill", DistillSpec

    def apply(self, ctx: Context, model: nn.Module, spec: DistillSpec) -> nn.Module:
        wl = ctx.workload
        if spec.loss == "kd" and wl.task != "classification":
            raise SpecError(f"DistillSpec.loss='kd' needs a classifier; workload {wl.name!r} is an {wl.task!r} "
                            "workload, expected loss 'mse' or 'cosine'.")
        student = self.restructure(ctx, model, spec)
        objective = None
        if spec.hidden or spec.relations:
            objective = build_objective(wl.teacher, student, wl.train.tensors[:wl.n_inputs], wl.input_names, spec,
                                        ctx.teacher_key, ctx.cache)
        student = distill(student, ctx.teacher_out.outputs, wl.train, spec, ctx.validate, ctx.seed, inputs=wl.n_inputs,
                          layerwise=objective)
        if objective is not None:
            ctx.stats["layer_target_samples"] = ctx.stats.get("layer_target_samples", 0) + objective.targets.forward_samples
        return student

    def restructure(self, ctx: Context, model: nn.Module, spec: DistillSpec) -> nn.Module:
        torch.manual_seed(ctx.seed)
        wl = ctx.workload
        if spec.init == "student" and wl.make_student is not None:
            return wl.make_student(spec.width, spec.depth)
        if spec.init == "student" and spec.width != 1.0:
            raise SpecError(f"DistillSpec.width={spec.width!r}: workload {wl.name!r} has no student factory, so its "
                            "students are made of the teacher's layers; expected width 1.0 (narrow a model with an "
                            "l1-structured prune step first).")
        base = model if spec.init == "parent" else wl.teacher
        keep = None
        if spec.layers == "important":
            head = torch.utils.data.TensorDataset(*(t[:IMPORTANCE_SAMPLES] for t in wl.val.tensors))
            keep = important_layers(base, spec.depth, lambda m: wl.quality(m.eval(), head))
        return shallower(base, spec.depth, keep=keep)

    def lacks(self, workload: Workload, spec: DistillSpec) -> str | None:
        if spec.init == "parent" or workload.make_student is not None or find_blocks(workload.teacher) is not None:
            return None
        return "make_student"

    def check(self, workload: Workload, spec: DistillSpec) -> None:
        own_layers = spec.init == "parent" or workload.make_student is None
        if spec.layers == "important" and not own_layers:
            raise SpecError(f"DistillSpec.layers='important' picks among the teacher's own layers, but workload "
                            f"{workload.name!r} builds its students with its factory; expected init: parent (or layers: even).")
        if own_layers:
            blocks_of(workload.teacher, "DistillSpec.init='parent' (students made of the teacher's layers)")
        if not (spec.hidden or spec.relations):
            return
        teacher = blocks_of(workload.teacher, "DistillSpec.hidden/relations (the teacher)")
        if spec.init == "student" and workload.make_student is not None:
            student = blocks_of(workload.make_student(spec.width, spec.depth), "DistillSpec.hidden/relations (the student)")
        else:  # the teacher's layers (an earlier prune step changes widths, not the layer count)
            student = blocks_of(shallower(workload.teacher, spec.depth), "DistillSpec.hidden/relations (the student)")
        mapping = layer_map(spec.layer_map, teacher, student)
        if spec.relations and spec.init == "student":
            relation_heads(spec.relation_heads, teacher, student, mapping[-1])

    def size_floor(self, ctx: Context, params: int, bytes_per: float, spec: DistillSpec) -> tuple[int, float]:
        wl = ctx.workload
        if spec.init == "student" and wl.make_student is not None:
            return sum(p.numel() for p in wl.make_student(spec.width, spec.depth).parameters()), bytes_per
        full = sum(p.numel() for p in wl.teacher.parameters())
        kept = sum(p.numel() for p in shallower(wl.teacher, spec.depth).parameters())
        return (int(params * kept / full) if spec.init == "parent" else kept), bytes_per

    def cost(self, spec: DistillSpec, width: float) -> tuple[float, float]:
        if spec.init == "parent":
            return spec.epochs * width * spec.depth, width * spec.depth
        return spec.epochs * spec.width * spec.depth, spec.width * spec.depth

    def epochs(self, spec: DistillSpec) -> int:
        return spec.epochs

    def uses_teacher(self, spec: DistillSpec) -> bool:
        return True

    def label(self, spec: DistillSpec) -> str:
        layerwise = ("-h" if spec.hidden else "") + ("-r" if spec.relations else "")
        return (f"distill-{'p' if spec.init == 'parent' else 'w'}{spec.width * 100:g}-d{spec.depth * 100:g}"
                f"-e{spec.epochs}{layerwise}")


@register
class Prune(Step):
    kind, spec = "prune", PruneSpec

    def apply(self, ctx: Context, model: nn.Module, spec: PruneSpec) -> nn.Module:
        return self._prune(ctx, model, spec, lambda m, ft: _finetune(ctx, m, ft))

    def restructure(self, ctx: Context, model: nn.Module, spec: PruneSpec) -> nn.Module:
        if spec.method.startswith("magnitude"):
            return model  # zeros, not shapes: the state dict carries them
        return self._prune(ctx, model, spec, None)  # shapes follow from the ratio, whatever the weights

    @staticmethod
    def _prune(ctx: Context, model: nn.Module, spec: PruneSpec, finetune) -> nn.Module:
        wl = ctx.workload
        own = model.model if isinstance(model, Call) else model  # the user's hooks see the user's model
        heads = wl.num_heads(own) if wl.num_heads else None
        ignored = wl.prune_ignored(own) if wl.prune_ignored else None
        prune_(model, spec, wl.example_inputs, finetune=finetune, num_heads=heads, ignored=ignored)
        return model

    def size_floor(self, ctx: Context, params: int, bytes_per: float, spec: PruneSpec) -> tuple[int, float]:
        keep = 1.0 - spec.ratio
        return int(params * (keep * keep if spec.method.endswith("structured") else keep)), bytes_per

    def cost(self, spec: PruneSpec, width: float) -> tuple[float, float]:
        return spec.finetune.epochs * spec.iterations * width, width

    def epochs(self, spec: PruneSpec) -> int:  # its fine-tuning, every iteration
        return spec.finetune.epochs * spec.iterations

    def uses_teacher(self, spec: PruneSpec) -> bool:
        return spec.finetune.epochs > 0

    def label(self, spec: PruneSpec) -> str:
        return f"prune-{spec.method}-{spec.ratio * 100:g}" + (f"-x{spec.iterations}" if spec.iterations > 1 else "")


@register
class Finetune(Step):
    kind, spec = "finetune", FinetuneSpec

    def apply(self, ctx: Context, model: nn.Module, spec: FinetuneSpec) -> nn.Module:
        _finetune(ctx, model, spec)
        return model

    def cost(self, spec: FinetuneSpec, width: float) -> tuple[float, float]:
        return spec.epochs * width, width

    def epochs(self, spec: FinetuneSpec) -> int:
        return spec.epochs

    def uses_teacher(self, spec: FinetuneSpec) -> bool:
        return spec.epochs > 0

    def label(self, spec: FinetuneSpec) -> str:
        return f"finetune-e{spec.epochs}"


@register
class Vocab(Step):
    kind, spec, needs = "vocab", VocabSpec, ("shrink_vocab",)

    def apply(self, ctx: Context, model: nn.Module, spec: VocabSpec) -> nn.Module:
        return ctx.workload.shrink_vocab(model, spec)

    restructure = apply  # deterministic: the kept rows follow from the training data

    def size_floor(self, ctx: Context, params: int, bytes_per: float, spec: VocabSpec) -> tuple[int, float]:
        table = max((m.weight.numel() for m in ctx.workload.teacher.modules() if isinstance(m, nn.Embedding)), default=0)
        return params - table, bytes_per  # at best, every row of the largest table goes


@register
class Quantize(Step):
    kind, spec, cached = "quantize", QuantSpec, False

    def apply(self, ctx: Context, model: nn.Module, spec: QuantSpec) -> nn.Module:
        return quantize(model, spec, ctx.workload.example_inputs, ctx.workload.calibration)

    def size_floor(self, ctx: Context, params: int, bytes_per: float, spec: QuantSpec) -> tuple[int, float]:
        return params, min(bytes_per, SCHEMES[spec.scheme].weight_bits / 8)

    def share(self, model: nn.Module, spec: QuantSpec) -> float:
        total = sum(p.numel() for p in model.parameters()) or 1
        modules = dict(model.named_modules())
        return sum(p.numel() for name in selected_layers(model, spec) for p in modules[name].parameters(recurse=False)) / total


def check_capabilities(workload: Workload, recipes: tuple[Recipe, ...]) -> None:
    """Refuse, before the teacher runs, a recipe whose step needs what the workload lacks."""
    for recipe in recipes:
        for i, step in enumerate(recipe.steps):
            if (need := STEPS[step.kind].lacks(workload, step)) is not None:
                raise SpecError(f"Recipe {recipe.name!r} steps[{i}] ({step.kind}) needs the workload's {need!r}, "
                                f"which workload {workload.name!r} does not provide; expected a Workload with "
                                f"{need} set, or a recipe without {step.kind} steps.")
            try:
                STEPS[step.kind].check(workload, step)
            except SpecError as exc:
                raise SpecError(f"Recipe {recipe.name!r} steps[{i}] ({step.kind}): {exc}") from None


def training_work(recipe: Recipe) -> float:
    """A rough cost of a recipe: its training epochs, each weighted by the width of what it trains."""
    work, width = 0.0, 1.0
    for spec in recipe.steps:
        step_work, width = STEPS[spec.kind].cost(spec, width)
        work += step_work
    return work


def training_samples(recipe: Recipe, n_train: int, done: frozenset[str] = frozenset()) -> float:
    """A recipe's training in teacher-sized sample passes (:func:`training_load`'s last part)."""
    return training_load(recipe.steps, n_train, done)[2]


def training_load(specs: tuple, n_train: int, done: frozenset[str] = frozenset()) -> tuple[int, float, float]:
    """The training of ``specs`` (a recipe's or a prefix's steps): (prefix tasks run; samples drawn,
    epochs x ``samples_per_epoch`` or the split's ``n_train``; those weighted by the width trained, as
    :func:`training_work`). A small model's epoch costs about its draws, a large one's its weighted
    samples. Steps whose prefix is in ``done`` (:func:`prefix_identity`: cached) cost nothing."""
    runs, draws, total, width, prefix = 0, 0.0, 0.0, 1.0, []
    for spec in specs:
        step = STEPS[spec.kind]
        step_work, width = step.cost(spec, width)
        per_epoch = min(n_train, getattr(spec, "samples_per_epoch", None)
                        or getattr(getattr(spec, "finetune", None), "samples_per_epoch", None) or n_train)
        if step.cached:
            prefix.append(spec)
            if prefix_identity(tuple(prefix)) in done:
                continue
            runs += 1
        draws += step.epochs(spec) * per_epoch
        total += step_work * per_epoch
    return runs, draws, total


def prefix_identity(prefix: tuple) -> str:
    """A training prefix's identity (its steps' specs, in order)."""
    return json.dumps([s.model_dump(mode="json") for s in prefix], sort_keys=True)


# ---------------------------------------------------------------- the prefix cache


def training_prefix(recipe: Recipe) -> tuple:
    """The steps whose results the prefix cache keeps (everything before the quantize steps)."""
    return tuple(s for s in recipe.steps if STEPS[s.kind].cached)


@dataclass(frozen=True)
class PrefixNode:
    """One distinct training prefix of a sweep: its steps, and the node of the prefix one shorter."""

    steps: tuple
    parent: int | None

    @property
    def kind(self) -> str:
        return self.steps[-1].kind

    @property
    def label(self) -> str:
        return "+".join(STEPS[s.kind].label(s) for s in self.steps)


def plan(recipes: tuple[Recipe, ...] | list[Recipe]) -> tuple[list[PrefixNode], dict[str, int | None]]:
    """The tree of a sweep's training prefixes: every distinct prefix once, parents before
    children, and for each recipe the node its quantize/measure leaf hangs from (None: the teacher)."""
    index: dict[str, int] = {}
    nodes: list[PrefixNode] = []
    leaf_of: dict[str, int | None] = {}
    for recipe in recipes:
        parent, prefix = None, training_prefix(recipe)
        for i in range(len(prefix)):
            ident = json.dumps([s.model_dump(mode="json") for s in prefix[: i + 1]], sort_keys=True)
            if ident not in index:
                index[ident] = len(nodes)
                nodes.append(PrefixNode(prefix[: i + 1], parent))
            parent = index[ident]
        leaf_of[recipe.name] = parent
    return nodes, leaf_of


def prefix_keys(root: str, steps, seed: int) -> list[str]:
    """Content keys of each prefix of ``steps``: key[i] identifies the model after steps[:i+1]."""
    keys, parent = [], root
    for step in steps:
        what = {"parent": parent, "step": step.model_dump(mode="json"), "seed": seed, "versions": VERSIONS}
        parent = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
        keys.append(parent)
    return keys


def _blob_key(key: str) -> str:
    return f"prefixes/{key}.pt"


#: The state-dict entry of a stored prefix that holds the validation curves of its chain's steps.
CURVES = "__shrinkflow_curves__"


def _replay(curves: list[list[float]], steps) -> None:
    """Tell the monitor (a search trial's pruner) the validation scores a reused prefix's steps
    saw when they were computed, step by step, as if they trained now: a trial built on a stored
    prefix is judged on the same curve whether this run or an earlier one computed it, so a rerun
    over a warm cache asks, prunes and picks exactly as a cold run did."""
    if (monitor := MONITOR.get()) is None:
        return
    for i, curve in enumerate(curves):
        step = TrainingStep(i, steps[i].kind, STEPS[steps[i].kind].epochs(steps[i]))
        token = TRAINING.set(step)
        try:
            for score in curve:
                monitor(step, float(score))
        finally:
            TRAINING.reset(token)


def _cached_state(ctx: Context, key: str, refused: set[str]) -> dict | None:
    if ctx.cache is None:
        return None
    try:
        blob = ctx.cache.get(_blob_key(key))
    except ArtifactError as exc:  # corrupt or truncated: recompute it, and replace it
        logger.warning("prefix %s refused (%s): recomputing it", key[:12], exc)
        refused.add(key)
        return None
    return loads(blob, f"prefix {key!r}") if blob is not None else None


def _store(ctx: Context, key: str, model: nn.Module, replace: bool, curves: list[list[float]]) -> nn.Module:
    """Store a computed prefix with the validation curves of its steps. If a racing worker stored
    it first, use theirs, so that every variant built on this prefix, whoever computed it, starts
    from the same weights."""
    if ctx.cache is None or ctx.cache.put(_blob_key(key), dumps(model.state_dict() | {CURVES: curves}), replace=replace):
        return model
    logger.info("prefix %s was stored by another worker meanwhile: using that one", key[:12])
    state = loads(ctx.cache.get(_blob_key(key)), f"prefix {key!r}")
    state.pop(CURVES, None)
    model.load_state_dict(state)
    return model


def _load(ctx: Context, steps, keys: list[str], hit: int, state: dict) -> nn.Module | None:
    """The model after steps[:hit+1], rebuilt and loaded from its cached state; None if it does not fit."""
    model = copy.deepcopy(ctx.workload.teacher).eval()
    for step in steps[: hit + 1]:
        model = STEPS[step.kind].restructure(ctx, model, step)
    try:
        model.load_state_dict({k: v for k, v in state.items() if k != CURVES})
    except RuntimeError as exc:
        logger.warning("prefix %s does not fit its rebuilt architecture (%s): recomputing it", keys[hit][:12], exc)
        return None
    return model.eval()


def materialize(ctx: Context, steps) -> tuple[nn.Module, list[str]]:
    """The model after ``steps`` (no quantize steps), reusing the longest cached prefix.

    Returns the model and the prefix keys. Each training step computed here is stored under its
    key, so every later recipe, sweep or worker that shares the prefix loads it instead.
    """
    keys, refused = prefix_keys(ctx.teacher_key, steps, ctx.seed), set()
    model, start, curves = copy.deepcopy(ctx.workload.teacher).eval(), 0, []
    for hit in range(len(steps) - 1, -1, -1):
        if STEPS[steps[hit].kind].cached and (state := _cached_state(ctx, keys[hit], refused)) is not None:
            loaded = _load(ctx, steps, keys, hit, state)
            if loaded is not None:
                model, start = loaded, hit + 1
                ctx.stats["reused"] += 1
                # One curve per step of steps[:hit+1]; a prefix stored before curves were carries
                # none, and then nothing is replayed.
                curves = [[float(x) for x in c] for c in state.get(CURVES, [])][:hit + 1]
                curves += [[] for _ in range(hit + 1 - len(curves))]
                _replay(curves, steps)
                break
    for i in range(start, len(steps)):
        torch.manual_seed(ctx.seed)
        curve: list[float] = []
        token, recording = TRAINING.set(TrainingStep(i, steps[i].kind, STEPS[steps[i].kind].epochs(steps[i]))), CURVE.set(curve)
        try:
            model = STEPS[steps[i].kind].apply(ctx, model, steps[i]).eval()
        finally:
            CURVE.reset(recording)
            TRAINING.reset(token)
        curves.append(curve)
        if STEPS[steps[i].kind].cached:
            ctx.stats["computed"] += 1
            model = _store(ctx, keys[i], model, replace=keys[i] in refused, curves=curves)
    return model, keys
