"""Mixed precision for the search's quantization options, read from the sensitivity pass.

Each option (:class:`~shrinkflow.sensitivity.QuantOption`) is shaped by the teacher's measured
:class:`~shrinkflow.sensitivity.Sensitivity`:

* :func:`kept_float`: the most sensitive groups stay in float until the rest's summed drop is
  within the allowance (:func:`with_groups` applies it to an option).
* :func:`low_bit_units`: what a low-bit scheme (int4) is given in, single layers or groups, the
  cheapest per byte saved first; :func:`with_groups` puts them in the low precision while their
  summed drop is within half the allowance.
* :func:`fit_low_bits`: the option with more layers in the low precision, until the teacher's
  size estimate fits the budget; :func:`band_low_bits`: the options within the best-quality
  rule's tie band.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from shrinkflow.budget import MB
from shrinkflow.quantize import SCHEMES, estimated_bytes
from shrinkflow.sensitivity import QuantOption, Sensitivity, groups, layer_params, low_schemes
from shrinkflow.specs import QuantSpec

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
    size = {u: layer_params(teacher, list(u)) for u, _ in units if u}
    return sorted(((u, d) for u, d in units if u), key=lambda ud: (max(0.0, ud[1]) / max(1, size[ud[0]]), -size[ud[0]]))


def _saved_per_param(scheme: str) -> float:
    """Bytes per weight that ``scheme`` saves against what its layers get otherwise (its
    ``rest_bits``, else float)."""
    return ((SCHEMES[scheme].rest_bits or 32) - SCHEMES[scheme].weight_bits) / 8


def _option_units(option: QuantOption, sens: Sensitivity, teacher: nn.Module) -> list[tuple[tuple[str, ...], float, str]]:
    """:func:`low_bit_units` of every low-bit scheme of ``option`` (Linear layers in int4 rather
    than int8, embedding tables in int4 rows rather than float) in one order, the cheapest per
    byte saved first, each with its scheme."""
    units = [(u, d, scheme) for scheme in low_schemes(option) for u, d in low_bit_units(sens, scheme, teacher)]
    saved = {u: layer_params(teacher, list(u)) * _saved_per_param(scheme) for u, _, scheme in units}
    return sorted(units, key=lambda x: (max(0.0, x[1]) / max(1e-9, saved[x[0]]), -saved[x[0]]))


def _measured_rows(option: QuantOption, step: QuantSpec, sens: Sensitivity) -> bool:
    """Whether ``step`` is one of ``option``'s low-bit embedding steps whose tables the pass measured."""
    return step.scheme in low_schemes(option)[1:] and step.scheme in sens.layers


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


def with_groups(option: QuantOption, sens: Sensitivity, teacher: nn.Module, allowed: float) -> QuantOption:
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


def fit_low_bits(option: QuantOption, sens: Sensitivity, teacher: nn.Module, limit_bytes: float
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


def band_low_bits(option: QuantOption, sens: Sensitivity, teacher: nn.Module, tolerance: float) -> list[QuantOption]:
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
