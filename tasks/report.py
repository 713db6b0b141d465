"""What a person sees: the Pareto plot on the MLflow parent run, and Prefect UI artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from shrinkflow.budget import MB
from shrinkflow.specs import Budget, Selection, VariantResult
from tasks import tracking


def pareto_png(results: list[VariantResult], teacher: VariantResult, sel: Selection, limits: Budget, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.report] + [teacher]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, attr, scale, label, limit in (
        (axes[0], "size_bytes", 1 / MB, "size (MB, shipped)", limits.max_size_mb),
        (axes[1], "latency_p50_ms", 1.0, "latency p50 (ms)", limits.max_latency_ms),
    ):
        for r in measured:
            x, y = getattr(r.report, attr) * scale, r.report.quality
            style = {"marker": "*", "s": 220, "c": "tab:red"} if r.name == sel.winner else \
                {"marker": "s", "s": 60, "c": "black"} if r is teacher else \
                {"marker": "o", "s": 40, "c": "tab:blue" if r.fits else "tab:gray"}
            ax.scatter([x], [y], **style)
            ax.annotate(r.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", label=f"budget {limit:g}")
        if limits.max_quality_drop is not None:
            ax.axhline(teacher.report.quality - limits.max_quality_drop, color="tab:orange", linestyle=":",
                       label="quality floor")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("quality")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"winner: {sel.winner or 'none fits'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows(results: list[VariantResult]) -> list[dict]:
    out = []
    for r in results:
        rep = r.report
        out.append({
            "variant": r.name,
            "fits": "skipped" if r.skipped else ("yes" if r.fits else "no: " + ",".join(m.limit for m in r.verdict.misses)),
            "quality": round(rep.quality, 4) if rep else None,
            "size_bytes": rep.size_bytes if rep else None,
            "latency_p50_ms": round(rep.latency_p50_ms, 3) if rep else None,
            "energy_mj": round(rep.energy_mj, 4) if rep else None,
            "mlflow_run": r.run_id,
        })
    return out


@task(name="report", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def report_task(parent_run_id: str, results: list[VariantResult], teacher: VariantResult, sel: Selection,
                limits: Budget, summary: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        png = pareto_png(results, teacher, sel, limits, Path(tmp) / "pareto.png")
        tracking.retrying(tracking.client().log_artifact, parent_run_id, str(png))
    create_table_artifact(rows([teacher, *results]), key="variants", description="Every variant of this sweep")
    create_markdown_artifact(summary, key="summary", description="Winner and where it went")
