"""Pick the best variant under a budget and describe the trade-off front."""

from __future__ import annotations

from collections.abc import Sequence

from shrinkflow.specs import Selection, VariantResult


def _pareto(results: Sequence[VariantResult], cost: str) -> tuple[str, ...]:
    """Names of variants not dominated on (higher quality, lower cost)."""
    pts = [(r.name, r.report.quality or 0.0, getattr(r.report, cost)) for r in results if r.report]
    front = [
        name
        for name, q, c in pts
        if not any((q2 >= q and c2 <= c) and (q2 > q or c2 < c) for _, q2, c2 in pts)
    ]
    return tuple(sorted(front))


def select(results: Sequence[VariantResult], nearest: int = 3) -> Selection:
    """Among variants meeting every limit: highest quality, then lowest latency, then smallest size.

    A sweep where nothing fits is a normal outcome: ``winner`` is None and ``nearest_misses``
    names the variants that came closest (smallest summed excess over their broken limits).
    """
    measured = [r for r in results if r.report is not None and r.verdict is not None]
    fitting = [r for r in measured if r.verdict.fits]
    best = min(
        fitting,
        key=lambda r: (-(r.report.quality or 0.0), r.report.latency_p50_ms, r.report.size_bytes),
        default=None,
    )
    misses = sorted(
        (r for r in measured if not r.verdict.fits),
        key=lambda r: sum(m.excess for m in r.verdict.misses),
    )
    return Selection(
        winner=best.name if best else None,
        fitting=tuple(r.name for r in fitting),
        pareto_size=_pareto(measured, "size_bytes"),
        pareto_latency=_pareto(measured, "latency_p50_ms"),
        nearest_misses=tuple(r.name for r in misses[:nearest]),
    )
