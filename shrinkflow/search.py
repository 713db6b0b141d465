"""Budget-driven search: what to try on a model, derived from its layers, its sensitivity and the budget.

The engine (Optuna: its sampler, pruner and storage) is driven from ``tasks/search.py``; this
module is the model-side half it asks, pure PyTorch:

* :func:`groups` splits a model into layer groups (a block's attention, its FFN, an embedding
  table, the head, a conv stage) from its module names.
* :func:`sensitivity` measures, once per teacher and cached content-addressed, the validation
  quality drop of each group quantized alone (by each scheme the space may use on it) and of the
  whole model pruned, without fine-tuning, at a few ratios.
* :func:`derive` turns the model, that sensitivity, the device and the budget into a
  :class:`Space`: students (width x depth) whose size floor can fit, prune methods with the
  ratios fine-tuning can still recover from, quantization options with the groups that stay in
  float (mixed precision: the most sensitive groups are kept in float until the rest's summed
  drop is within half the allowed quality drop), and the runtimes the device runs.
* :func:`suggest` turns one trial (anything with Optuna's ``suggest_categorical`` and
  ``suggest_float``) into a :class:`Recipe`; :func:`score` and :func:`violation` are what a
  finished trial reports back (a value to maximise, and a constraint that is <= 0 when every
  limit of the budget is met).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable

from pydantic import Field
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from shrinkflow import auto, steps
from shrinkflow.budget import MB, DeviceProfile
from shrinkflow.cache import dumps, loads
from shrinkflow.errors import ShrinkflowError, SpecError
from shrinkflow.layerwise import TERMS, find_blocks, shallower
from shrinkflow.prune import prune_
from shrinkflow.quantize import INT4_GROUP, LAYER_TYPES, SCHEMES, estimated_bytes
from shrinkflow.specs import (
    Budget,
    DistillSpec,
    FinetuneSpec,
    Frozen,
    PruneSpec,
    QuantSpec,
    Recipe,
    SearchSpec,
    SweepSpec,
    VariantResult,
)

logger = logging.getLogger(__name__)

#: Bump when the sensitivity pass changes what it measures (it is part of the cache key).
SENSITIVITY_VERSION = 3
#: A probe scheme that, applied to every layer it acts on at once, loses at most this share of the
#: teacher's validation quality is not probed group by group: each group is given the whole
#: model's drop in proportion to its parameters. That is the tightest preset's allowance for the
#: quantized groups (a 1-point drop, halved: see :func:`derive`), so under the presets it changes
#: no group's precision (none would stay in float). On MiniLM it leaves only the int4 probes
#: group by group: the pass took 320 s on 2 cores before, with every scheme probed per group.
NEGLIGIBLE_DROP = 0.005
#: The sensitivity pass scores each probe on at most this many validation samples, spread evenly
#: over the split: MiniLM's probes on all 1,000 validation sentences took longer than the
#: hand-written sweep's whole variants phase. (Digits' 359 are all kept: an accuracy on fewer
#: samples is too coarse to rank groups that each lose a fraction of a point.)
SENSITIVITY_SAMPLES = 512
#: Whole-model prune ratios probed without fine-tuning, per method family.
PRUNE_PROBES = {"magnitude-global": (0.5, 0.7, 0.8, 0.9), "l1-structured": (0.2, 0.4, 0.6)}
#: A prune ratio is searched when, before any fine-tuning, it keeps at least this share of the
#: teacher's validation quality: past that, fine-tuning a few epochs rarely brings it back.
RECOVERABLE = 0.5
#: Student shapes tried when the workload can build students: width and depth fractions.
WIDTHS = (0.5, 0.35, 0.25, 0.15, 0.1)
DEPTHS = (1.0, 0.67)
#: Depths of students made of a transformer teacher's own layers (no student factory).
LAYER_DEPTHS = (0.67, 0.5)
#: Distillation length (epochs, with early stopping; the pruner stops a student that falls behind
#: after a third of them). One length, so that trials differing only after the distillation share
#: it from the prefix cache instead of training a student again.
DISTILL_EPOCHS = (60,)
#: A training split larger than this is not walked whole per epoch: each epoch of a trial's
#: distillation draws this many random samples, and there are LARGE_DISTILL_EPOCHS of them; a
#: fine-tune after pruning draws half as many, LARGE_FINETUNE_EPOCHS times (MiniLM's hand-written
#: recipes: 3 x 4,096 and 2 x 2,048). Sixty epochs of 35,652 MiniLM sentences would take hours.
LARGE_SPLIT = 4096
LARGE_DISTILL_EPOCHS = 4
LARGE_FINETUNE_EPOCHS = 2
#: Students of a transformer on a large split keep the teacher's trained layers: they are tuned
#: gently (AdamW at 1e-4, cosine), as MiniLM's hand-written recipes and the layerwise benchmark do.
#: The default (3e-3, one-cycle) suits students trained from their initialisation.
PRETRAINED_DISTILL = {"lr": 1e-4, "scheduler": "cosine"}


# ---------------------------------------------------------------- layer groups


def _group_of(name: str) -> str:
    """The group a layer belongs to: within a numbered block (``encoder.layer.3.attention.self.query``)
    the block's sub-module (``encoder.layer.3.attention``), or the block itself when its layers sit
    directly in it (``features.0.0`` -> ``features.0``); outside numbered blocks the top-level module
    (``head.1`` -> ``head``, ``embeddings.word_embeddings`` -> ``embeddings``)."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
    if index is None:
        return parts[0]
    if index + 2 < len(parts) and not parts[index + 1].isdigit():
        return ".".join(parts[: index + 2])
    return ".".join(parts[: index + 1])


def groups(model: nn.Module) -> dict[str, list[str]]:
    """Layer groups of ``model``: group name -> the names of its quantizable layers (Linear, Conv,
    Embedding, RNN), in model order. Layers outside every numbered block group by top-level module."""
    types = tuple(t for ts in LAYER_TYPES.values() for t in ts)
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, types):
            out.setdefault(_group_of(name), []).append(name)
    return out


def _params(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters(recurse=False))


# ---------------------------------------------------------------- quantization options


class QuantOption(Frozen):
    """One way to quantize a model the search may pick: its quantize steps, the runtime it ships
    on, and the probe scheme whose per-group sensitivity decides what stays in float."""

    name: str
    runtime: str
    steps: tuple[QuantSpec, ...] = ()
    probe: str | None = Field(None, description="Scheme probed per group; sensitive groups are kept in float.")
    low_bits: str | None = Field(None, description="A lower-precision scheme used on the groups it hardly hurts.")


#: The runtimes :func:`quant_options` builds options for (ONNX Runtime variants are hand-written recipes).
SEARCHED_RUNTIMES = ("torch", "executorch")


def quant_options(teacher: nn.Module, runtimes: tuple[str, ...]) -> list[QuantOption]:
    """The quantization options for ``teacher``'s layer kinds, on the runtimes allowed.

    torch: int8 (static int8 of convolutions and Linear layers when the model has convolutions,
    else dynamic int8 of Linear layers; weight-only int8 of embeddings and RNN layers) and fp16.
    executorch (XNNPACK): int8 and int4 (int4 where the group hardly loses, int8 elsewhere) on
    Linear layers, int4 or int8 on embeddings. Each only where those layers hold >= 1% of the
    parameters; "fp32" (no quantization) is always an option.
    """
    shares = auto.census(teacher)
    has = {kind for kind, share in shares.items() if share >= auto.MIN_SHARE}
    weight_only = tuple(QuantSpec(scheme="int8-weight-only", layers=k) for k in ("embedding", "rnn") if k in has)
    out = []
    if "torch" in runtimes:
        out.append(QuantOption(name="fp32", runtime="torch"))
        main = "int8-static" if "conv" in has else "int8-dynamic" if "linear" in has else None
        if main or weight_only:
            main_steps = (QuantSpec(scheme=main),) if main else ()
            out.append(QuantOption(name="int8", runtime="torch", steps=main_steps + weight_only, probe=main))
        if has & {"linear", "conv"}:
            out.append(QuantOption(name="fp16", runtime="torch", steps=(QuantSpec(scheme="fp16"),), probe="fp16"))
    if "executorch" in runtimes:
        out.append(QuantOption(name="xnn-fp32", runtime="executorch"))
        if "linear" in has:
            emb = "embedding" in has
            emb8 = (QuantSpec(scheme="int8-weight-only", layers="embedding"),) if emb else ()
            emb4 = (QuantSpec(scheme="int4-weight-only", layers="embedding"),) if emb else ()
            out.append(QuantOption(name="xnn-int8", runtime="executorch", probe="int8-dynamic-intx",
                                   steps=(QuantSpec(scheme="int8-dynamic-intx"), *emb8)))
            out.append(QuantOption(name="xnn-int4", runtime="executorch", probe="int8-dynamic-intx",
                                   low_bits="int4-dynamic-intx", steps=(QuantSpec(scheme="int4-dynamic-intx"), *emb4)))
    return out


# ---------------------------------------------------------------- sensitivity


class GroupDrop(Frozen):
    group: str
    params: int
    drops: dict[str, float] = Field(default_factory=dict, description="Probe scheme -> validation quality drop.")


class Sensitivity(Frozen):
    """Validation quality drops of the teacher, measured once: per layer group quantized alone by
    each probe scheme, and the whole model pruned without fine-tuning at each probed ratio."""

    baseline: float
    groups: tuple[GroupDrop, ...]
    prune: dict[str, dict[str, float]] = Field(default_factory=dict, description="method -> ratio -> drop")
    refused: dict[str, str] = Field(default_factory=dict, description="probe -> why it could not run on this model")
    seconds: float = 0.0


def _probe_schemes(options: list[QuantOption]) -> list[str]:
    return sorted({s for o in options for s in (o.probe, o.low_bits) if s})


def sensitivity_key(ctx: steps.Context, probes: list[str]) -> str:
    what = {"teacher": ctx.teacher_key, "probes": probes, "prune": PRUNE_PROBES, "seed": ctx.seed,
            "versions": steps.VERSIONS, "version": SENSITIVITY_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def sensitivity(ctx: steps.Context, options: list[QuantOption]) -> Sensitivity:
    """The teacher's sensitivity to each probe (see :class:`Sensitivity`), from the cache when any
    earlier search on the same teacher, data and seed measured it."""
    probes = _probe_schemes(options)
    key = f"sensitivity/{sensitivity_key(ctx, probes)}.json"
    if ctx.cache is not None and (blob := ctx.cache.get(key)) is not None:
        return Sensitivity.model_validate(loads(blob, f"sensitivity {key!r}"))
    t0 = time.perf_counter()
    score = probe_scorer(ctx.workload)
    probed = score(ctx.workload.teacher.eval())  # drops are against the teacher on the same samples
    refused: dict[str, str] = {}
    groups_ = _quant_drops(ctx, probes, probed, refused, score)
    prune = _prune_drops(ctx, probed, refused, score)
    # the baseline that trials are compared with (pruner, recoverable ratios) is on the whole split, as theirs are
    result = Sensitivity(baseline=ctx.validate(ctx.workload.teacher.eval()), groups=groups_, prune=prune, refused=refused,
                         seconds=time.perf_counter() - t0)
    if ctx.cache is not None:
        ctx.cache.put(key, dumps(result.model_dump(mode="json")))
    return result


def probe_scorer(wl) -> Callable[[nn.Module], float]:
    """The validation quality of a model on at most SENSITIVITY_SAMPLES samples of ``wl.val``, every
    k-th one (a split sorted by length keeps its spread of lengths); the whole split when smaller."""
    val = wl.val
    if isinstance(val, TensorDataset) and len(val) > SENSITIVITY_SAMPLES:
        step = -(-len(val) // SENSITIVITY_SAMPLES)
        val = TensorDataset(*(t[::step] for t in val.tensors))
    return lambda model: wl.quality(model.eval(), val)


#: Samples in each of the two batches :func:`train_seconds_per_sample` runs (the first untimed).
RATE_BATCH = 32


def train_seconds_per_sample(ctx: steps.Context) -> float:
    """What one training sample costs the teacher here (forward and backward, in this process's
    threads): the scale of a trial's time estimate before any trial has trained. Timed on a batch
    of samples spread over the training split, after an untimed one."""
    wl = ctx.workload
    n = len(wl.train)
    b = max(1, min(RATE_BATCH, n // 2))
    picks = torch.linspace(0, n - 1, 2 * b).long().tolist()
    model = copy.deepcopy(wl.teacher).train()
    seconds = 0.0
    try:
        for i, batch in enumerate(DataLoader(Subset(wl.train, picks), batch_size=b)):
            t0 = time.perf_counter()
            out = model(*batch[: wl.n_inputs])
            if out.requires_grad:
                out.float().square().mean().backward()
            seconds = time.perf_counter() - t0 if i else 0.0
    except Exception as exc:  # noqa: BLE001 - e.g. BatchNorm on a one-sample batch: the estimate then starts at 0
        logger.warning("search: could not time a training batch of the teacher (%s: %s); trial estimates start "
                       "from the untrained trial's time alone", type(exc).__name__, exc)
        return 0.0
    return seconds / b


def _quant_drops(ctx: steps.Context, probes: list[str], baseline: float, refused: dict[str, str],
                 score: Callable[[nn.Module], float]) -> tuple[GroupDrop, ...]:
    """Each layer group quantized alone by each probe scheme that acts on its layers; a scheme
    whose whole-model drop is negligible (:data:`NEGLIGIBLE_DROP`) is shared out by parameters."""
    teacher = ctx.workload.teacher
    by_group = groups(teacher)
    layers = {scheme: {g: tuple(n for n in names if isinstance(teacher.get_submodule(n), SCHEMES[scheme].types))
                       for g, names in by_group.items()} for scheme in probes}

    def drop(scheme: str, include: tuple[str, ...]) -> float | None:
        try:
            model = steps.STEPS["quantize"].apply(ctx, copy.deepcopy(teacher), QuantSpec(scheme=scheme, include=include))
            return baseline - score(model)
        except Exception as exc:  # noqa: BLE001 - a scheme this model cannot take is left out of the space
            refused[scheme] = f"{type(exc).__name__}: {exc}"[:300]
            return None

    shared: dict[str, float] = {}  # scheme -> whole-model drop, where it is negligible
    for scheme in probes:
        acted = [g for g, names in layers[scheme].items() if names]
        if len(acted) > 1 and (whole := drop(scheme, tuple(n for g in acted for n in layers[scheme][g]))) is not None \
                and whole <= NEGLIGIBLE_DROP * abs(baseline):
            shared[scheme] = whole
    out = []
    for group, names in by_group.items():
        drops = {}
        for scheme in probes:
            if not layers[scheme][group] or scheme in refused:
                continue
            if scheme in shared:
                total = sum(_params(teacher, list(n)) for n in layers[scheme].values() if n)
                drops[scheme] = shared[scheme] * _params(teacher, list(layers[scheme][group])) / max(1, total)
            elif (d := drop(scheme, layers[scheme][group])) is not None:
                drops[scheme] = d
        out.append(GroupDrop(group=group, params=_params(teacher, names), drops=drops))
    return tuple(out)


def _prune_drops(ctx: steps.Context, baseline: float, refused: dict[str, str],
                 score: Callable[[nn.Module], float]) -> dict[str, dict[str, float]]:
    """The whole teacher pruned at each probed ratio, without fine-tuning."""
    wl, out = ctx.workload, {}
    for method, ratios in PRUNE_PROBES.items():
        out[method] = {}
        for ratio in ratios:
            model = copy.deepcopy(wl.teacher)
            try:
                prune_(model, PruneSpec(method=method, ratio=ratio, finetune=FinetuneSpec(epochs=0)), wl.example_inputs,
                       num_heads=wl.num_heads(model) if wl.num_heads else None,
                       ignored=wl.prune_ignored(model) if wl.prune_ignored else None)
                out[method][str(ratio)] = baseline - score(model)
            except Exception as exc:  # noqa: BLE001 - a method this model cannot take is left out of the space
                refused[method] = f"{type(exc).__name__}: {exc}"[:300]
                break
    return out


def kept_float(sens: Sensitivity, scheme: str, allowed: float) -> tuple[str, ...]:
    """The groups that stay in float under ``scheme``: the most sensitive, one by one, until the
    summed drop of the groups left quantized is within ``allowed``."""
    measured = sorted((g for g in sens.groups if scheme in g.drops), key=lambda g: -g.drops[scheme])
    total = sum(max(0.0, g.drops[scheme]) for g in measured)
    keep = []
    for g in measured:
        if total <= allowed:
            break
        keep.append(g.group)
        total -= max(0.0, g.drops[scheme])
    return tuple(keep)


def low_bit_groups(sens: Sensitivity, scheme: str, allowed: float) -> tuple[str, ...]:
    """The groups that take ``scheme`` (a lower precision): the least sensitive, while their summed
    drop stays within ``allowed``."""
    measured = sorted((g for g in sens.groups if scheme in g.drops), key=lambda g: g.drops[scheme])
    chosen, total = [], 0.0
    for g in measured:
        total += max(0.0, g.drops[scheme])
        if total > allowed:
            break
        chosen.append(g.group)
    return tuple(chosen)


# ---------------------------------------------------------------- the space


class Space(Frozen):
    """What the search may try on one model under one budget (see :func:`derive`)."""

    students: tuple[str, ...] = Field((), description="'teacher' (no distillation) and 'w<width>-d<depth>' students.")
    distill_epochs: tuple[int, ...] = DISTILL_EPOCHS
    samples_per_epoch: int | None = Field(None, description="Samples per distillation epoch (None: the whole split).")
    train_samples: int = Field(0, description="Samples in the training split (a trial's time estimate).")
    distill_schedule: dict[str, float | str] = Field(default_factory=dict, description="lr and scheduler, if not the default.")
    distill_loss: str = "kd"
    distill_init: str = Field("student", description="'student': the workload's factory; 'parent': the teacher's layers.")
    layerwise: bool = Field(False, description="Transformer: students also learn hidden states and attention relations.")
    prune_methods: tuple[str, ...] = ("none",)
    prune_ratios: dict[str, tuple[float, float]] = Field(default_factory=dict, description="method -> (low, high)")
    finetune: FinetuneSpec = Field(default_factory=lambda: FinetuneSpec(epochs=6, scheduler="cosine"))
    quant: tuple[QuantOption, ...] = ()
    teacher_fits: tuple[str, ...] = Field((), description="The quantization options under which the teacher itself "
                                          "is estimated to fit max_size_mb (no limit: all): tried first, they train nothing.")
    why: dict[str, str] = Field(default_factory=dict, description="What was left out of the space, and why.")

    def describe(self) -> str:
        parts = [f"students {len(self.students)}", f"prune {'/'.join(self.prune_methods)}",
                 f"quantization {'/'.join(o.name for o in self.quant)}"]
        return "; ".join(parts)


def _student_name(width: float, depth: float) -> str:
    return f"w{width * 100:g}-d{depth * 100:g}"


def _student_shape(name: str) -> tuple[float, float]:
    w, d = re.fullmatch(r"w([\d.]+)-d([\d.]+)", name).groups()
    return float(w) / 100, float(d) / 100


def _fits_floor(params: int, bytes_per: float, limits: Budget) -> bool:
    return limits.max_size_mb is None or params * bytes_per * 0.5 <= limits.max_size_mb * MB


def _bytes_per_param(model: nn.Module, best_bytes: float) -> float:
    """``best_bytes`` per parameter of ``model`` at best, where 4-bit codes take only the layers
    whose rows are whole int4 groups (Linear inputs, embedding widths); the others get int8."""
    if best_bytes >= 1.0:
        return best_bytes
    total = sum(p.numel() for p in model.parameters()) or 1
    grouped = sum(m.weight.numel() for m in model.modules()
                  if (isinstance(m, nn.Linear) and m.in_features % INT4_GROUP == 0)
                  or (isinstance(m, nn.Embedding) and m.embedding_dim % INT4_GROUP == 0))
    return (grouped * best_bytes + (total - grouped)) / total


def _with_groups(option: QuantOption, sens: Sensitivity, teacher: nn.Module, allowed: float) -> QuantOption:
    """``option`` with its float-kept groups (from its probe) and, for a low-bit option, the groups
    that take the low precision; the other steps unchanged."""
    if option.probe is None:
        return option
    layer_names = groups(teacher)
    keep = kept_float(sens, option.probe, allowed)
    keep_names = tuple(n for g in keep for n in layer_names.get(g, ()))
    main, *rest = option.steps
    if option.low_bits:
        low = [g for g in low_bit_groups(sens, option.low_bits, allowed / 2) if g not in keep]
        include = tuple(n for g in low for n in layer_names[g] if isinstance(teacher.get_submodule(n), nn.Linear))
        if not include:  # no group takes int4 cheaply: this is the int8 option, already in the space
            return option.model_copy(update={"steps": ()})
        main = main.model_copy(update={"include": include, "keep_float": keep_names})
    else:
        main = main.model_copy(update={"keep_float": keep_names})
    return option.model_copy(update={"steps": (main, *rest)})


def _fit_low_bits(option: QuantOption, sens: Sensitivity, teacher: nn.Module, limit_bytes: float
                  ) -> tuple[QuantOption | None, str]:
    """When the teacher under ``option`` (a low-bit option, its groups chosen by quality) would not
    fit ``limit_bytes`` by :func:`~shrinkflow.quantize.estimated_bytes`: the option that puts the
    next least sensitive groups in the low precision too, one by one, until the teacher fits (the
    effective-bits search of per-layer mixed precision). Its quality is for the trial to measure.
    Returns (the option, "") or (None, why not; "" when the teacher fits already)."""
    main, *rest = option.steps
    if estimated_bytes(teacher, option.steps) <= limit_bytes:
        return None, ""
    layer_names = groups(teacher)
    include = list(main.include)
    order = sorted((g for g in sens.groups if option.low_bits in g.drops), key=lambda g: g.drops[option.low_bits])
    added = 0
    for g in order:
        names = [n for n in layer_names.get(g.group, ()) if isinstance(teacher.get_submodule(n), nn.Linear)
                 and n not in include and not any(fnmatch.fnmatchcase(n, p) for p in main.keep_float)]
        if not names:
            continue
        include += names
        added += 1
        steps_ = (main.model_copy(update={"include": tuple(include)}), *rest)
        if estimated_bytes(teacher, steps_) <= limit_bytes:
            return option.model_copy(update={"name": f"{option.name}-fit", "steps": steps_}), ""
    return None, (f"the teacher does not fit {limit_bytes / MB:g} MB even with every measured group in "
                  f"{option.low_bits} (estimated {estimated_bytes(teacher, steps_) / MB:.2f} MB)" if added
                  else f"no further group can take {option.low_bits}")


def derive(ctx: steps.Context, profile: DeviceProfile, limits: Budget, sens: Sensitivity,
           options: list[QuantOption], search: SearchSpec) -> Space:
    """The search space for ``ctx``'s teacher on ``profile`` under ``limits`` (module docstring)."""
    wl, teacher, why = ctx.workload, ctx.workload.teacher, {}
    allowed = (limits.max_quality_drop if limits.max_quality_drop is not None else 0.01 * abs(sens.baseline)) / 2
    quant = []
    for option in options:
        if option.probe in sens.refused:
            why[option.name] = f"{option.probe} does not apply to this model: {sens.refused[option.probe]}"
            continue
        shaped = _with_groups(option, sens, teacher, allowed)
        if option.steps and not shaped.steps:
            why[option.name] = f"no layer group loses under {allowed / 2:g} of quality with {option.low_bits}"
            continue
        quant.append(shaped)
    if not quant:
        raise ShrinkflowError(f"search: no runtime of device {profile.name!r} ({', '.join(profile.runtimes)}) is left "
                              f"with search.runtime={search.runtime!r}; expected a runtime the device runs.")
    methods, ratios = ["none"], {}
    for method, drops in sens.prune.items():
        ok = [float(r) for r, d in drops.items() if sens.baseline - d >= RECOVERABLE * sens.baseline]
        if method in sens.refused or not ok:
            why[method] = sens.refused.get(method, f"every probed ratio keeps under {RECOVERABLE:.0%} of the quality")
            continue
        methods.append(method)
        ratios[method] = (0.2, max(ok))
    if limits.max_size_mb is not None:
        for option in [o for o in quant if o.low_bits]:
            fit, reason = _fit_low_bits(option, sens, teacher, limits.max_size_mb * MB)
            if fit is not None:
                quant.append(fit)
            elif reason:
                why[f"{option.name}-fit"] = reason
    # The estimate was 0-6% above the programs measured (quantize.ESTIMATE_SCALE_BYTES); 5% of slack.
    teacher_fits = tuple(o.name for o in quant if o.steps and (
        limits.max_size_mb is None or estimated_bytes(teacher, o.steps) <= 1.05 * limits.max_size_mb * MB))
    best_bytes = min([4.0] + [SCHEMES[s.scheme].weight_bits / 8 for o in quant for s in o.steps])
    sparsest = 1.0 - ratios.get("magnitude-global", (0.0, 0.0))[1]  # unstructured zeros entropy-code away
    students = ["teacher"]
    if not _fits_floor(int(sum(p.numel() for p in teacher.parameters()) * sparsest), _bytes_per_param(teacher, best_bytes), limits):
        students.remove("teacher")
        why["teacher"] = "the teacher's architecture cannot fit max_size_mb, even pruned and quantized; students only"
    blocks = find_blocks(teacher)
    init = "student"
    if wl.make_student is not None:
        shapes = [(w, d) for w in WIDTHS for d in DEPTHS]
        built, refused = _factory_students(wl.make_student, shapes)
        if not built and blocks is not None and len(blocks) > 1:
            # A factory that keeps the teacher's width (MiniLM's drops layers): its students are depths.
            built, _ = _factory_students(wl.make_student, [(1.0, d) for d in LAYER_DEPTHS])
            depths = {}  # a shallow teacher: two depths that keep the same layer count are one student
            for shape, student in built:
                depths.setdefault(len(find_blocks(student) or ()), (shape, student))
            built = list(depths.values())
        if refused:
            why["student shapes"] = (f"the workload's student factory refused {len(refused)} of {len(shapes)} shapes "
                                     f"({', '.join(refused)}): {next(iter(refused.values()))}")
        for (w, d), student in built:
            if _fits_floor(sum(p.numel() for p in student.parameters()), _bytes_per_param(student, best_bytes), limits):
                students.append(_student_name(w, d))
    elif blocks is not None and len(blocks) > 1:  # a transformer without a factory: its own layers, fewer of them
        init, seen = "parent", set()
        for d in LAYER_DEPTHS:
            student = shallower(teacher, d)
            if (depth := len(find_blocks(student))) in seen:  # a shallow teacher: two depths that keep the same layers
                continue
            seen.add(depth)
            if _fits_floor(sum(p.numel() for p in student.parameters()), _bytes_per_param(student, best_bytes), limits):
                students.append(_student_name(1.0, d))
    else:
        why["students"] = "the workload cannot build students (no make_student, and no transformer layers to drop)"
    if not students:
        raise ShrinkflowError(f"search: nothing the search can build fits max_size_mb={limits.max_size_mb} (field "
                              "budget.max_size_mb); expected a larger limit, or a workload that builds smaller students.")
    loss = "kd" if wl.task == "classification" else "cosine"
    large = isinstance(wl.train, TensorDataset) and len(wl.train) > LARGE_SPLIT
    ft = FinetuneSpec(epochs=LARGE_FINETUNE_EPOCHS if large else 6, scheduler="cosine",
                      kd_alpha=0.5 if wl.task == "classification" else 1.0,
                      samples_per_epoch=LARGE_SPLIT // 2 if large else None)
    epochs = (search.epochs,) if search.epochs else (LARGE_DISTILL_EPOCHS,) if large else DISTILL_EPOCHS
    return Space(students=tuple(students), distill_loss=loss, distill_init=init, layerwise=blocks is not None,
                 distill_epochs=epochs, samples_per_epoch=LARGE_SPLIT if large else None, train_samples=len(wl.train),
                 distill_schedule=PRETRAINED_DISTILL if large and blocks is not None else {},
                 prune_methods=tuple(methods), prune_ratios=ratios, finetune=ft, quant=tuple(quant),
                 teacher_fits=teacher_fits if "teacher" in students else (), why=why)


def _factory_students(make_student, shapes: list[tuple[float, float]]
                      ) -> tuple[list[tuple[tuple[float, float], nn.Module]], dict[str, str]]:
    """The students ``make_student`` builds for ``shapes`` (width, depth), and the shapes it refuses
    (a SpecError: a factory may support only some widths or depths) with its message, by name."""
    built, refused = [], {}
    for w, d in shapes:
        try:
            built.append(((w, d), make_student(w, d)))
        except SpecError as exc:
            refused[_student_name(w, d)] = str(exc)
    return built, refused


def check(spec: SweepSpec, profile: DeviceProfile) -> None:
    """Refuse, before anything runs or is written, a search whose fixed parts the device contradicts."""
    runtime = spec.search.runtime if spec.search is not None else None
    if spec.searching and runtime is not None and runtime not in profile.runtimes:
        raise SpecError(f"Invalid value {runtime!r} for field 'search.runtime': device {profile.name!r} runs only "
                        f"{list(profile.runtimes)}; expected one of them, or no runtime.")
    if spec.searching and runtime is not None and runtime not in SEARCHED_RUNTIMES:
        raise SpecError(f"Invalid value {runtime!r} for field 'search.runtime': the search builds programs for "
                        f"{list(SEARCHED_RUNTIMES)}; expected one of them (an {runtime!r} variant is a hand-written recipe).")


# ---------------------------------------------------------------- trials


def suggest(trial, space: Space) -> Recipe | None:
    """The recipe ``trial`` picks from ``space`` (None: the teacher unchanged); the parameter names are stable (they are the
    study's), and conditional ones are asked only when they apply."""
    chain, name = [], []
    student = trial.suggest_categorical("student", list(space.students))
    if student != "teacher":
        width, depth = _student_shape(student)
        epochs = trial.suggest_categorical("distill_epochs", list(space.distill_epochs))
        layers = TERMS if space.layerwise else {}
        chain.append(DistillSpec(width=width, depth=depth, loss=space.distill_loss, epochs=epochs, init=space.distill_init,
                                 samples_per_epoch=space.samples_per_epoch, **space.distill_schedule, **layers))
        name.append(f"kd-{student}-e{epochs}")
    method = trial.suggest_categorical("prune", list(space.prune_methods))
    if method != "none":
        low, high = space.prune_ratios[method]
        ratio = round(trial.suggest_float(f"prune_ratio_{method}", low, high, step=0.1), 2)
        chain.append(PruneSpec(method=method, ratio=ratio, finetune=space.finetune))
        name.append(f"prune-{method.split('-')[1] if method.startswith('magnitude') else 'channels'}-{ratio * 100:g}")
    options = {o.name: o for o in space.quant}
    option = options[trial.suggest_categorical("quant", list(options))]
    chain.extend(option.steps)
    name.append(option.name)
    if not chain:
        return None  # the teacher itself: measured already, as the baseline
    return Recipe(name=f"t{trial.number:03d}-" + "+".join(name), steps=tuple(chain), runtime=option.runtime)


def score(result: VariantResult, objective: str, tolerance: float = 0.005, teacher_bytes: int | None = None) -> float:
    """What a finished trial reports to the study (maximised): the objective's own figure. For
    best-quality, the selection's tie rule too: the validation quality (the test split only
    judges) in steps of ``tolerance``, and within a step the smaller the better, by up to 0.9 of a
    step (size as a share of the teacher's)."""
    r = result.report

    def quality() -> float:
        q = r.extra.get("quality_val", r.quality or 0.0)
        if not tolerance or not teacher_bytes:
            return q
        return (q // tolerance) * tolerance + 0.9 * tolerance * (1.0 - min(1.0, r.size_bytes / teacher_bytes))

    return {"best-quality": quality, "smallest": lambda: -r.size_bytes / MB,
            "fastest": lambda: -r.latency_p50_ms, "lowest-energy": lambda: -r.energy_mj}[objective]()


def violation(result: VariantResult) -> float:
    """The summed excess over every broken limit (0.0: the variant fits): the trial's constraint."""
    return sum(m.excess for m in result.verdict.misses) if result.verdict else float("inf")


def front(results: list[VariantResult]) -> list[VariantResult]:
    """The Pareto front over (quality higher, size smaller, p50 lower) of the measured results."""
    pts = [r for r in results if r.report is not None]

    def dominates(a, b) -> bool:
        ka = (-(a.report.quality or 0.0), a.report.size_bytes, a.report.latency_p50_ms)
        kb = (-(b.report.quality or 0.0), b.report.size_bytes, b.report.latency_p50_ms)
        return all(x <= y for x, y in zip(ka, kb, strict=True)) and ka != kb

    return sorted((r for r in pts if not any(dominates(o, r) for o in pts)), key=lambda r: r.report.size_bytes)
