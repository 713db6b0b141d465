"""Pick the best variant under a budget and describe the trade-off front.

The rule is the sweep's ``objective``, with a stated tie rule:

- ``best-quality``: the highest quality wins; variants within ``tolerance`` of it are tied, and
  among them the smallest shipped file wins (then the lower p50). Quality differences below
  the test split's resolution do not buy a model many times larger.
- ``smallest``: the smallest shipped file, then the higher quality.
- ``fastest``: the lowest p50 latency, then the smaller file.
- ``lowest-energy``: the lowest energy per inference, then the smaller file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shrinkflow.specs import Objective, Selection, VariantResult

_KB = 1000


def _pareto(results: Sequence[VariantResult], cost: str) -> tuple[str, ...]:
    """Names of variants not dominated on (higher quality, lower cost)."""
    pts = [(r.name, r.report.quality or 0.0, getattr(r.report, cost)) for r in results if r.report]
    front = [
        name
        for name, q, c in pts
        if not any((q2 >= q and c2 <= c) and (q2 > q or c2 < c) for _, q2, c2 in pts)
    ]
    return tuple(sorted(front))


def _quality(r: VariantResult) -> float:
    return r.report.quality or 0.0


#: objective -> (rule in words, sort key given the best quality among the fitting and the tolerance)
RULES: dict[str, tuple[str, Callable[[VariantResult, float, float], tuple]]] = {
    # Within the tie band by size; outside it (the runner-up when the band holds the winner alone) by quality.
    "best-quality": ("highest quality; variants within {tol:g} of the best tie, and the smallest of them wins",
                     lambda r, best, tol: (_quality(r) < best - tol,
                                           r.report.size_bytes if _quality(r) >= best - tol else -_quality(r),
                                           -_quality(r), r.report.latency_p50_ms)),
    "smallest": ("smallest shipped file, then highest quality",
                 lambda r, best, tol: (r.report.size_bytes, -_quality(r), r.report.latency_p50_ms)),
    "fastest": ("lowest p50 latency, then smallest file",
                lambda r, best, tol: (r.report.latency_p50_ms, r.report.size_bytes, -_quality(r))),
    "lowest-energy": ("lowest energy per inference, then smallest file",
                      lambda r, best, tol: (r.report.energy_mj, r.report.size_bytes, -_quality(r))),
}


def _why(objective: str, ranked: list[VariantResult], tol: float) -> str:
    win, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    if second is None:
        return f"{win.name} is the only variant that fits."
    a, b = win.report, second.report
    q = f"quality {_quality(win):.4f} vs {_quality(second):.4f}"
    size = f"{a.size_bytes / _KB:,.1f} kB vs {b.size_bytes / _KB:,.1f} kB"
    if objective == "best-quality":
        best = max(ranked, key=_quality)
        band = [r for r in ranked if _quality(r) >= _quality(best) - tol]
        if len(band) > 1:
            top = "" if best is win else f"; the best quality is {best.name}'s {_quality(best):.4f}"
            return (f"{win.name} is the smallest of the {len(band)} variants within {tol:g} of the best quality{top}: "
                    f"smaller than {second.name} ({size}; {q}).")
        return (f"{win.name} has the highest quality ({_quality(win):.4f}); the next best, {second.name} "
                f"({_quality(second):.4f}), is more than {tol:g} below.")
    if objective == "smallest":
        return f"{win.name} is the smallest that fits ({size}; {q})."
    if objective == "fastest":
        return f"{win.name} is the fastest that fits (p50 {a.latency_p50_ms:.3f} vs {b.latency_p50_ms:.3f} ms; {q})."
    return f"{win.name} uses the least energy of those that fit ({a.energy_mj:.4f} vs {b.energy_mj:.4f} mJ; {q})."


def select(results: Sequence[VariantResult], objective: Objective = "best-quality", tolerance: float = 0.005,
           nearest: int = 3) -> Selection:
    """The winner among variants meeting every limit, by ``objective`` (see the module docstring).

    A sweep where nothing fits is a normal outcome: ``winner`` is None and ``nearest_misses``
    names the variants that came closest (smallest summed excess over their broken limits).
    """
    text, key = RULES[objective]
    measured = [r for r in results if r.report is not None and r.verdict is not None]
    fitting = [r for r in measured if r.verdict.fits]
    best_q = max((_quality(r) for r in fitting), default=0.0)
    ranked = sorted(fitting, key=lambda r: key(r, best_q, tolerance))
    misses = sorted(
        (r for r in measured if not r.verdict.fits),
        key=lambda r: sum(m.excess for m in r.verdict.misses),
    )
    win = ranked[0] if ranked else None
    second = ranked[1] if len(ranked) > 1 else None
    return Selection(
        winner=win.name if win else None,
        rule=f"{objective}: " + text.format(tol=tolerance),
        runner_up=second.name if second else None,
        why=_why(objective, ranked, tolerance) if win else "No variant meets every limit.",
        fitting=tuple(r.name for r in fitting),
        pareto_size=_pareto(measured, "size_bytes"),
        pareto_latency=_pareto(measured, "latency_p50_ms"),
        nearest_misses=tuple(r.name for r in misses[:nearest]),
    )


def misses_text(results: Sequence[VariantResult], names: Sequence[str]) -> str:
    """The nearest misses in words: each one's broken limits, by how much (``none`` if empty)."""
    by_name = {r.name: r for r in results}
    parts = []
    for name in names:
        r = by_name.get(name)
        if r is None or r.verdict is None:
            continue
        how = "; ".join(f"{m.label} {m.value:.4g} > {m.allowed:g} (+{m.excess:.0%})" for m in r.verdict.misses)
        parts.append(f"{name} ({how})")
    return ", ".join(parts) or "none"
