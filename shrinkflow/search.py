"""Budget-driven search: what to try on a model, derived from its layers, its sensitivity and the budget.

The engine (Optuna: its sampler, pruner and storage) is driven from ``tasks/search.py``; this
module is the model-side half it asks, pure PyTorch:

* :func:`groups` splits a model into layer groups (a block's attention, its FFN, an embedding
  table, the head, a conv stage) from its module names.
* :func:`sensitivity` measures, once per teacher and cached content-addressed, the validation
  quality drop of each group quantized alone (by each scheme the space may use on it), of each
  layer taken to a low-bit scheme alone (int4, over the int8 the rest of the model gets: the unit
  of per-layer mixed precision), and of the whole model pruned, without fine-tuning, at a few ratios.
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
SENSITIVITY_VERSION = 4
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
#: A low-bit scheme (int4) is probed layer by layer, not group by group, on models with at most
#: this many layers it can take: within a group the layers differ most (MiniLM: a block's query
#: and key lose 0.0001 of mean cosine in int4, its value up to 0.0053). Past it, group by group.
LAYER_PROBES_MAX = 64
#: Each layer probe is scored on at most this many validation samples (MiniLM: 36 probes, 112 s
#: on 2 cores): a layer's drop is a difference on the same samples, steady at this count.
LAYER_PROBE_SAMPLES = 256
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
    low_bits: str | None = Field(None, description="A lower-precision scheme used on the layers that lose least "
                                 "per byte it saves (measured over the probe's precision).")


#: The runtimes :func:`quant_options` builds options for (ONNX Runtime variants are hand-written recipes).
SEARCHED_RUNTIMES = ("torch", "executorch")


def quant_options(teacher: nn.Module, runtimes: tuple[str, ...]) -> list[QuantOption]:
    """The quantization options for ``teacher``'s layer kinds, on the runtimes allowed.

    torch: int8 (static int8 of convolutions and Linear layers when the model has convolutions,
    else dynamic int8 of Linear layers; weight-only int8 of embeddings and RNN layers) and fp16.
    executorch (XNNPACK): int8 and int4 (int4 where a layer loses least, int8 elsewhere) on
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
            # int4 rows on the embedding tables the sensitivity picks (all of them, unshaped); a recipe
            # quantizes a layer kind once, so the other tables stay in float, as in the hand-written one
            out.append(QuantOption(name="xnn-int4", runtime="executorch", probe="int8-dynamic-intx",
                                   low_bits="int4-dynamic-intx", steps=(QuantSpec(scheme="int4-dynamic-intx"), *emb4)))
    return out


# ---------------------------------------------------------------- sensitivity


class GroupDrop(Frozen):
    group: str
    params: int
    drops: dict[str, float] = Field(default_factory=dict, description=(
        "Probe scheme -> validation quality drop (against the float teacher; a low-bit scheme's against its "
        "probe precision everywhere: what the group costs over, say, int8, the sum of its layers' when probed per layer)."))


class Sensitivity(Frozen):
    """Validation quality drops of the teacher, measured once: per layer group quantized alone by
    each probe scheme, and the whole model pruned without fine-tuning at each probed ratio."""

    baseline: float
    groups: tuple[GroupDrop, ...]
    prune: dict[str, dict[str, float]] = Field(default_factory=dict, description="method -> ratio -> drop")
    layers: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Low-bit scheme -> layer -> validation quality drop of that layer alone in "
        "the low-bit scheme, over the option's probe precision everywhere (e.g. int4 over int8).")
    refused: dict[str, str] = Field(default_factory=dict, description="probe -> why it could not run on this model")
    seconds: float = 0.0


def _probe_schemes(options: list[QuantOption]) -> list[str]:
    return sorted({s for o in options for s in (o.probe, o.low_bits) if s})


def _low_schemes(option: QuantOption) -> list[str]:
    """``option``'s low-bit schemes: its Linear one (``low_bits``), then those of its other steps
    (int4 embedding rows)."""
    return [option.low_bits, *(s.scheme for s in option.steps[1:] if SCHEMES[s.scheme].weight_bits < 8)]


def _low_bit_pairs(options: list[QuantOption]) -> dict[str, str | None]:
    """Low-bit scheme -> the probe precision its option gives the other layers (None: float, as
    the embedding tables left out of int4 rows stay)."""
    out: dict[str, str | None] = {}
    for o in (o for o in options if o.low_bits):
        for scheme in _low_schemes(o):
            out.setdefault(scheme, o.probe if SCHEMES[scheme].rest_bits is not None else None)
    return out


def sensitivity_key(ctx: steps.Context, probes: list[str], pairs: dict[str, str | None] | None = None) -> str:
    what = {"teacher": ctx.teacher_key, "probes": probes, "prune": PRUNE_PROBES, "seed": ctx.seed,
            "versions": steps.VERSIONS, "version": SENSITIVITY_VERSION, "low_bits": pairs or {},
            "samples": [SENSITIVITY_SAMPLES, LAYER_PROBE_SAMPLES, LAYER_PROBES_MAX]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def sensitivity(ctx: steps.Context, options: list[QuantOption]) -> Sensitivity:
    """The teacher's sensitivity to each probe (see :class:`Sensitivity`), from the cache when any
    earlier search on the same teacher, data and seed measured it."""
    probes, pairs = _probe_schemes(options), _low_bit_pairs(options)
    key = f"sensitivity/{sensitivity_key(ctx, probes, pairs)}.json"
    if ctx.cache is not None and (blob := ctx.cache.get(key)) is not None:
        return Sensitivity.model_validate(loads(blob, f"sensitivity {key!r}"))
    t0 = time.perf_counter()
    score = probe_scorer(ctx.workload)
    probed = score(ctx.workload.teacher.eval())  # drops are against the teacher on the same samples
    refused: dict[str, str] = {}
    layers = _layer_drops(ctx, pairs, refused)
    groups_ = _quant_drops(ctx, [p for p in probes if p not in layers], probed, refused, score, layers, pairs)
    prune = _prune_drops(ctx, probed, refused, score)
    # the baseline that trials are compared with (pruner, recoverable ratios) is on the whole split, as theirs are
    result = Sensitivity(baseline=ctx.validate(ctx.workload.teacher.eval()), groups=groups_, prune=prune, refused=refused,
                         layers=layers, seconds=time.perf_counter() - t0)
    if ctx.cache is not None:
        ctx.cache.put(key, dumps(result.model_dump(mode="json")))
    return result


def probe_scorer(wl, samples: int = SENSITIVITY_SAMPLES) -> Callable[[nn.Module], float]:
    """The validation quality of a model on at most ``samples`` samples of ``wl.val``, every
    k-th one (a split sorted by length keeps its spread of lengths); a split of at most
    SENSITIVITY_SAMPLES is used whole (an accuracy on fewer is too coarse to rank layers)."""
    val = wl.val
    if isinstance(val, TensorDataset) and len(val) > SENSITIVITY_SAMPLES:
        step = -(-len(val) // samples)
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


def _quantized(ctx: steps.Context, scheme: str, include: tuple[str, ...], refused: dict[str, str]) -> nn.Module | None:
    """The teacher with ``scheme`` on the layers ``include`` names; None (and why, in ``refused``)
    when this model cannot take the scheme."""
    try:
        return steps.STEPS["quantize"].apply(ctx, copy.deepcopy(ctx.workload.teacher), QuantSpec(scheme=scheme, include=include))
    except Exception as exc:  # noqa: BLE001 - a scheme this model cannot take is left out of the space
        refused[scheme] = f"{type(exc).__name__}: {exc}"[:300]
        return None


def _low_bit_layers(teacher: nn.Module, scheme: str) -> list[str]:
    """The layers ``scheme`` acts on that can take its low bits (int4 needs whole groups of 32: a
    Linear layer's inputs, an embedding table's width)."""
    return [n for n, m in teacher.named_modules() if n and isinstance(m, SCHEMES[scheme].types) and (
        (isinstance(m, nn.Linear) and m.in_features % INT4_GROUP == 0)
        or (isinstance(m, nn.Embedding) and m.embedding_dim % INT4_GROUP == 0))]


def _layer_drops(ctx: steps.Context, pairs: dict[str, str | None], refused: dict[str, str]) -> dict[str, dict[str, float]]:
    """For each low-bit scheme of ``pairs`` (:func:`_low_bit_pairs`; :data:`LAYER_PROBES_MAX` layers
    or fewer): each layer alone in it, the rest of the model at its pair's precision, scored
    against the model with that precision everywhere (:data:`LAYER_PROBE_SAMPLES` samples). That
    is what moving one layer from, say, int8 to int4 costs, the unit :func:`low_bit_units` orders
    layers by."""
    teacher, out = ctx.workload.teacher, {}
    score = probe_scorer(ctx.workload, LAYER_PROBE_SAMPLES)
    for low, rest in pairs.items():
        names = _low_bit_layers(teacher, low)
        if not names or len(names) > LAYER_PROBES_MAX:
            continue
        reference = teacher if rest is None else _quantized(ctx, rest, (), refused)  # no include: every layer it takes
        if reference is None:
            continue
        base, drops = score(reference.eval()), {}
        for name in names:
            if (model := _quantized(ctx, low, (name,), refused)) is None:
                break
            drops[name] = base - score(model)
        if low not in refused:
            out[low] = drops
    return out


def _quant_drops(ctx: steps.Context, probes: list[str], baseline: float, refused: dict[str, str],
                 score: Callable[[nn.Module], float], layer_drops: dict[str, dict[str, float]] | None = None,
                 pairs: dict[str, str | None] | None = None) -> tuple[GroupDrop, ...]:
    """Each layer group quantized alone by each probe scheme that acts on its layers; a scheme
    whose whole-model drop is negligible (:data:`NEGLIGIBLE_DROP`) is shared out by parameters.
    A low-bit scheme probed layer by layer (``layer_drops``) gives each group the sum of its layers';
    one probed group by group counts its drop over its pair's precision everywhere (``pairs``: the
    probe of a group in int4 leaves the rest in int8, whose own drop is not the group's)."""
    teacher = ctx.workload.teacher
    by_group = groups(teacher)
    layers = {scheme: {g: tuple(n for n in names if isinstance(teacher.get_submodule(n), SCHEMES[scheme].types))
                       for g, names in by_group.items()} for scheme in probes}

    def drop(scheme: str, include: tuple[str, ...]) -> float | None:
        model = _quantized(ctx, scheme, include, refused)
        return None if model is None else baseline - score(model)

    shared: dict[str, float] = {}  # scheme -> whole-model drop, where it is negligible
    whole: dict[str, float] = {}
    for scheme in probes:
        acted = [g for g, names in layers[scheme].items() if names]
        if len(acted) > 1 and (d := drop(scheme, tuple(n for g in acted for n in layers[scheme][g]))) is not None:
            whole[scheme] = d
    # a low-bit scheme probed per group: the drop its pair's precision on every layer brings anyway
    over: dict[str, float] = {}
    for low, rest in (pairs or {}).items():
        if low in probes and rest is not None:
            over[low] = whole[rest] if rest in whole else (drop(rest, ()) or 0.0)  # no include: every layer it takes
    for scheme, d in whole.items():
        if d <= NEGLIGIBLE_DROP * abs(baseline):
            shared[scheme] = d - over.get(scheme, 0.0)
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
                drops[scheme] = d - over.get(scheme, 0.0)
        for scheme, per_layer in (layer_drops or {}).items():
            if any(n in per_layer for n in names):
                drops[scheme] = sum(per_layer.get(n, 0.0) for n in names)
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


def low_bit_units(sens: Sensitivity, scheme: str, teacher: nn.Module) -> list[tuple[tuple[str, ...], float]]:
    """What ``scheme`` (a low-bit scheme) is given in, the cheapest first, each with its measured
    drop: single layers where the pass probed them one by one (``sens.layers``), else groups (their
    layers of the kinds ``scheme`` takes). Cheapest: the least drop per parameter, i.e. per byte the low bits save (the
    greedy order of the knapsack "most bytes saved for the drop allowed"); on a tie, the larger."""
    if scheme in sens.layers:
        units = [((name,), d) for name, d in sens.layers[scheme].items()]
    else:
        by_group = groups(teacher)
        units = [(tuple(n for n in by_group.get(g.group, ()) if isinstance(teacher.get_submodule(n), SCHEMES[scheme].types)),
                  g.drops[scheme]) for g in sens.groups if scheme in g.drops]
    size = {u: _params(teacher, list(u)) for u, _ in units if u}
    return sorted(((u, d) for u, d in units if u), key=lambda ud: (max(0.0, ud[1]) / max(1, size[ud[0]]), -size[ud[0]]))


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
    quant_bytes: dict[str, int] = Field(default_factory=dict, description="Each quantization option's weights on the "
                                        "teacher, estimated (quantize.estimated_bytes): how options compare in size.")
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


def _saved_per_param(scheme: str) -> float:
    """Bytes per weight that ``scheme`` saves against what its layers get otherwise (its
    ``rest_bits``, else float)."""
    return ((SCHEMES[scheme].rest_bits or 32) - SCHEMES[scheme].weight_bits) / 8


def _option_units(option: QuantOption, sens: Sensitivity, teacher: nn.Module) -> list[tuple[tuple[str, ...], float, str]]:
    """:func:`low_bit_units` of every low-bit scheme of ``option`` (Linear layers in int4 rather
    than int8, embedding tables in int4 rows rather than float) in one order, the cheapest per
    byte saved first, each with its scheme."""
    units = [(u, d, scheme) for scheme in _low_schemes(option) for u, d in low_bit_units(sens, scheme, teacher)]
    saved = {u: _params(teacher, list(u)) * _saved_per_param(scheme) for u, _, scheme in units}
    return sorted(units, key=lambda x: (max(0.0, x[1]) / max(1e-9, saved[x[0]]), -saved[x[0]]))


def _measured_rows(option: QuantOption, step: QuantSpec, sens: Sensitivity) -> bool:
    """Whether ``step`` is one of ``option``'s low-bit embedding steps whose tables the pass measured."""
    return step.scheme in _low_schemes(option)[1:] and step.scheme in sens.layers


def _low_steps(option: QuantOption, chosen: dict[str, list[str]], sens: Sensitivity) -> tuple[QuantSpec, ...]:
    """``option``'s steps with ``chosen`` (scheme -> layers) in each low-bit scheme: the Linear
    layers in its first step's ``include``; the embedding tables in their step's, and a measured
    embedding step with none chosen left out (its tables stay in float). An
    embedding scheme the pass did not measure keeps its step as it is (int4 on every table)."""
    main, *rest = option.steps
    out = [main.model_copy(update={"include": tuple(chosen.get(option.low_bits, ()))})]
    for step in rest:
        if _measured_rows(option, step, sens):
            if chosen.get(step.scheme):
                out.append(step.model_copy(update={"include": tuple(chosen[step.scheme])}))
            continue
        out.append(step)
    return tuple(out)


def _chosen(option: QuantOption, sens: Sensitivity) -> dict[str, list[str]]:
    """The layers a shaped ``option`` puts in each of its measured low-bit schemes."""
    main, *rest = option.steps
    out = {option.low_bits: list(main.include)}
    for step in rest:
        if _measured_rows(option, step, sens):
            out[step.scheme] = list(step.include)
    return out


def _with_groups(option: QuantOption, sens: Sensitivity, teacher: nn.Module, allowed: float) -> QuantOption:
    """``option`` with its float-kept groups (from its probe) and, for a low-bit option, the layers
    that take the low precision (:func:`_option_units`, while their summed drop is within half of
    ``allowed``); the other steps unchanged."""
    if option.probe is None:
        return option
    layer_names = groups(teacher)
    keep = kept_float(sens, option.probe, allowed)
    keep_names = tuple(n for g in keep for n in layer_names.get(g, ()))
    if option.low_bits:
        chosen: dict[str, list[str]] = {}
        total = 0.0
        for names, d, scheme in _option_units(option, sens, teacher):
            if any(n in keep_names for n in names):
                continue
            total += max(0.0, d)
            if total > allowed / 2:
                break
            chosen.setdefault(scheme, []).extend(names)
        if not chosen.get(option.low_bits):  # no Linear layer takes int4 cheaply: this is the int8 option
            return option.model_copy(update={"steps": ()})
        main, *rest = _low_steps(option, chosen, sens)
    else:
        main, *rest = option.steps
    return option.model_copy(update={"steps": (main.model_copy(update={"keep_float": keep_names}), *rest)})


def _more_low_bits(option: QuantOption, sens: Sensitivity, teacher: nn.Module):
    """The layers ``option`` (a shaped low-bit option) could add to its low-precision ones, cheapest
    first (:func:`_option_units`), each with its drop and the option's steps once it is added."""
    keep = option.steps[0].keep_float
    chosen = _chosen(option, sens)
    for names, d, scheme in _option_units(option, sens, teacher):
        names = [n for n in names if n not in chosen.get(scheme, ()) and not any(fnmatch.fnmatchcase(n, p) for p in keep)]
        if names:
            chosen.setdefault(scheme, []).extend(names)
            yield d, _low_steps(option, chosen, sens)


def _fit_low_bits(option: QuantOption, sens: Sensitivity, teacher: nn.Module, limit_bytes: float
                  ) -> tuple[QuantOption | None, str]:
    """When the teacher under ``option`` (a low-bit option, its layers chosen by quality) would not
    fit ``limit_bytes`` by :func:`~shrinkflow.quantize.estimated_bytes`: the option that puts the
    next cheapest layers (or groups) in the low precision too, one by one, until the teacher fits
    (the effective-bits search of per-layer mixed precision). Its quality is for the trial to measure.
    Returns (the option, "") or (None, why not; "" when the teacher fits already)."""
    if estimated_bytes(teacher, option.steps) <= limit_bytes:
        return None, ""
    steps_ = None
    for _, steps_ in _more_low_bits(option, sens, teacher):
        if estimated_bytes(teacher, steps_) <= limit_bytes:
            return option.model_copy(update={"name": f"{option.name}-fit", "steps": steps_}), ""
    unit = "layer" if option.low_bits in sens.layers else "group"
    return None, (f"the teacher does not fit {limit_bytes / MB:g} MB even with every measured {unit} in "
                  f"{option.low_bits} (estimated {estimated_bytes(teacher, steps_) / MB:.2f} MB)" if steps_
                  else f"no further {unit} can take {option.low_bits}")


#: The -band options explore the best-quality rule's tie band: each rung adds low-bit layers while
#: their summed drop stays within this share of ``quality_tolerance``. Summed single-layer drops
#: under-predicted the measured drop by about 1.2x on MiniLM (0.0026 estimated, 0.0031 measured),
#: so the full rung may measure just outside the band; the half rung stays inside it.
BAND_RUNGS = (0.5, 1.0)


def _band_low_bits(option: QuantOption, sens: Sensitivity, teacher: nn.Module, tolerance: float) -> list[QuantOption]:
    """``option`` (a low-bit option the teacher fits under) with the next cheapest layers in the low
    precision too, one option per rung of :data:`BAND_RUNGS`: while their summed drop stays within
    that share of ``tolerance``. Smaller programs the best-quality rule, which ties variants within
    the tolerance and ships the smallest, may prefer. Rungs that add nothing, or the same layers
    as the rung below, are left out."""
    out, seen = [], set()
    for rung in BAND_RUNGS:
        total, chosen = 0.0, None
        for d, steps_ in _more_low_bits(option, sens, teacher):
            total += max(0.0, d)
            if total > rung * tolerance:
                break
            chosen = steps_
        if chosen is not None and chosen not in seen:
            seen.add(chosen)
            out.append(option.model_copy(update={"name": f"{option.name}-band{rung * 100:g}", "steps": chosen}))
    return out


#: The quantization option tried on the teacher itself first, in order of preference.
FIRST_QUANT = ("int8", "xnn-int8")


def first_untrained(names: list[str], teacher_fits: tuple[str, ...]) -> str | None:
    """The option (of ``names``) the teacher is tried under first, untrained: int8 (the point every
    engineer tries first) when its size estimate fits the limit, else the first option in
    ``teacher_fits``, else int8 all the same (a measured reference); None without any of those."""
    first = [name for name in FIRST_QUANT if name in names][:1]
    fitting = [name for name in (*first, *teacher_fits) if name in names and name in teacher_fits]
    return next(iter(fitting or first), None)


def derive(ctx: steps.Context, profile: DeviceProfile, limits: Budget, sens: Sensitivity,
           options: list[QuantOption], search: SearchSpec, tolerance: float | None = None) -> Space:
    """The search space for ``ctx``'s teacher on ``profile`` under ``limits`` (module docstring).
    ``tolerance``: the best-quality rule's tie band (the sweep's ``quality_tolerance``; None for
    another objective), which the option the teacher is tried under first explores with its
    ``-band`` siblings (:func:`_band_low_bits`)."""
    wl, teacher, why = ctx.workload, ctx.workload.teacher, {}
    allowed = (limits.max_quality_drop if limits.max_quality_drop is not None else 0.01 * abs(sens.baseline)) / 2
    quant = []
    for option in options:
        if option.probe in sens.refused:
            why[option.name] = f"{option.probe} does not apply to this model: {sens.refused[option.probe]}"
            continue
        shaped = _with_groups(option, sens, teacher, allowed)
        if option.steps and not shaped.steps:
            why[option.name] = (f"{option.low_bits} could not be probed: {sens.refused[option.low_bits]}"
                                if option.low_bits in sens.refused else
                                f"no layer loses under {allowed / 2:g} of quality with {option.low_bits}")
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
    # The bands start from the first option's -fit sibling where it has one: within the estimate's
    # slack the first option itself may measure just over the limit.
    first = first_untrained([o.name for o in quant], teacher_fits)
    anchor = next((o for name in (f"{first}-fit", first) for o in quant if o.name == name and name in teacher_fits), None)
    if tolerance and anchor is not None and anchor.low_bits:
        bands = _band_low_bits(anchor, sens, teacher, tolerance)
        quant += bands
        teacher_fits += tuple(b.name for b in bands)
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
                 teacher_fits=teacher_fits if "teacher" in students else (),
                 quant_bytes={o.name: estimated_bytes(teacher, o.steps) for o in quant}, why=why)


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


#: Objectives for which a smaller program is the better one at equal quality (best-quality's tie rule).
SIZE_OBJECTIVES = ("best-quality", "smallest")


def reuse_params(params: dict, space: Space, objective: str) -> list[dict]:
    """The trials that reuse a finished trial's training (``params``: its Optuna parameters) under
    the space's other quantization options: the same student and pruning, so the same cached
    training prefix, and only a quantization and a measurement to pay. For a size objective
    (:data:`SIZE_OBJECTIVES`) only the options estimated smaller than its own on the teacher
    (:attr:`Space.quant_bytes`), the smallest first; otherwise every other option, in the space's order."""
    own = params.get("quant")
    if own not in space.quant_bytes:
        return []
    names = [o.name for o in space.quant if o.name != own]
    if objective in SIZE_OBJECTIVES:
        names = sorted((n for n in names if space.quant_bytes[n] < space.quant_bytes[own]), key=space.quant_bytes.get)
    return [params | {"quant": name} for name in names]


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
