"""The search's sensitivity pass: what quantizing or pruning each part of the teacher costs, measured once.

The model-side half of the search (:mod:`shrinkflow.search`) starts here, pure PyTorch:

* :func:`groups` splits a model into layer groups (a block's attention, its FFN, an embedding
  table, the head, a conv stage) from its module names.
* :func:`quant_options` lists the ways the search may quantize the model (:class:`QuantOption`):
  their steps, runtime, and the probe schemes whose sensitivity shapes them.
* :func:`sensitivity` measures, once per teacher and cached content-addressed, the validation
  quality drop of each group quantized alone (by each scheme the space may use on it), of each
  layer taken to a low-bit scheme alone (int4, over the int8 the rest of the model gets: the unit
  of per-layer mixed precision), and of the whole model pruned, without fine-tuning, at a few ratios.

:mod:`shrinkflow.precision` reads that sensitivity to shape each option's mixed precision.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable

from pydantic import Field
import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow import auto, steps
from shrinkflow.cache import dumps, loads
from shrinkflow.prune import prune_
from shrinkflow.quantize import INT4_GROUP, LAYER_TYPES, SCHEMES
from shrinkflow.specs import FinetuneSpec, Frozen, PruneSpec, QuantSpec

#: Bump when the sensitivity pass changes what it measures (it is part of the cache key).
SENSITIVITY_VERSION = 5
#: A probe scheme that, applied to every layer it acts on at once, loses at most this share of the
#: teacher's validation quality is not probed group by group: each group is given the whole
#: model's drop in proportion to its parameters. That is the tightest preset's allowance for the
#: quantized groups (a 1-point drop, halved: see :func:`shrinkflow.search.derive`), so under the
#: presets it changes no group's precision (none would stay in float). On MiniLM it leaves only the
#: int4 probes group by group: the pass took 320 s on 2 cores before, with every scheme probed per group.
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


def layer_params(model: nn.Module, names: list[str]) -> int:
    """The parameters of the layers ``names`` of ``model`` (each layer's own, not its children's)."""
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


def low_schemes(option: QuantOption) -> list[str]:
    """``option``'s low-bit schemes: its Linear one (``low_bits``), then those of its other steps
    (int4 embedding rows)."""
    return [option.low_bits, *(s.scheme for s in option.steps[1:] if SCHEMES[s.scheme].weight_bits < 8)]


def _low_bit_pairs(options: list[QuantOption]) -> dict[str, str | None]:
    """Low-bit scheme -> the probe precision its option gives the other layers (None: float, as
    the embedding tables left out of int4 rows stay)."""
    out: dict[str, str | None] = {}
    for o in (o for o in options if o.low_bits):
        for scheme in low_schemes(o):
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
    is what moving one layer from, say, int8 to int4 costs, the unit
    :func:`shrinkflow.precision.low_bit_units` orders layers by."""
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
                total = sum(layer_params(teacher, list(n)) for n in layers[scheme].values() if n)
                drops[scheme] = shared[scheme] * layer_params(teacher, list(layers[scheme][group])) / max(1, total)
            elif (d := drop(scheme, layers[scheme][group])) is not None:
                drops[scheme] = d - over.get(scheme, 0.0)
        for scheme, per_layer in (layer_drops or {}).items():
            if any(n in per_layer for n in names):
                drops[scheme] = sum(per_layer.get(n, 0.0) for n in names)
        out.append(GroupDrop(group=group, params=layer_params(teacher, names), drops=drops))
    return tuple(out)


def _prune_drops(ctx: steps.Context, baseline: float, refused: dict[str, str],
                 score: Callable[[nn.Module], float]) -> dict[str, dict[str, float]]:
    """The whole teacher pruned at each probed ratio, without fine-tuning. A method that removes
    under a tenth of the share of the parameters its ratio asks for is refused: the layers it
    prunes hold too little of this model (a GRU's Linear head: pruning it would train a fine-tune
    for an unchanged program)."""
    wl, out = ctx.workload, {}
    held = _nonzero(wl.teacher)
    for method, ratios in PRUNE_PROBES.items():
        out[method] = {}
        for ratio in ratios:
            model = copy.deepcopy(wl.teacher)
            try:
                prune_(model, PruneSpec(method=method, ratio=ratio, finetune=FinetuneSpec(epochs=0)), wl.example_inputs,
                       num_heads=wl.num_heads(model) if wl.num_heads else None,
                       ignored=wl.prune_ignored(model) if wl.prune_ignored else None)
            except Exception as exc:  # noqa: BLE001 - a method this model cannot take is left out of the space
                refused[method] = f"{type(exc).__name__}: {exc}"[:300]
                break
            if (removed := 1.0 - _nonzero(model) / max(1, held)) < ratio / 10:
                kinds = ", ".join(f"{k} {v:.0%}" for k, v in sorted(auto.census(wl.teacher).items(), key=lambda kv: -kv[1]))
                refused[method] = (f"at ratio {ratio:g} it removes {removed:.1%} of the parameters: the layers it prunes "
                                   f"hold too little of this model ({kinds})")
                break
            out[method][str(ratio)] = baseline - score(model)
    return out


def _nonzero(model: nn.Module) -> int:
    """Parameters of ``model`` that are not zero (what pruning, structured or not, takes away)."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())
