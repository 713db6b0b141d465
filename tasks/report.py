"""What a person sees: the Pareto plot and the sweep's description on the MLflow parent run, and
the Prefect UI artifacts (the summary and the variants table).

The formatting here is pure (records in, text or a PNG out) so it is unit-tested without servers;
:func:`report_task` only writes what it builds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from shrinkflow.budget import MB
from shrinkflow.specs import Budget, Selection, VariantResult
from tasks import tracking

KB = 1000
WINNER_MARK = "★"


def human_size(n: float | None) -> str:
    """Bytes as ``394.2 kB`` or ``1.23 MB`` (10^3 and 10^6)."""
    if n is None:
        return "-"
    return f"{n / MB:,.2f} MB" if n >= MB else f"{n / KB:,.1f} kB"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The MLflow UI page of a run, when the tracking URI is a server a browser can open."""
    if not (run_id and experiment_id and tracking_uri.startswith(("http://", "https://"))):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(tracking_uri: str, experiment_id: str | None) -> str | None:
    """The experiment's runs in the MLflow UI, as model training: MLflow 3.17's UI shows an
    experiment in its GenAI view unless the address (or a per-browser switch) asks otherwise."""
    if not (experiment_id and tracking_uri.startswith(("http://", "https://"))):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _fits(r: VariantResult) -> str:
    if r.skipped:
        return "skipped: " + r.skipped[:60]
    if r.verdict is None:
        return "-"
    return "yes" if r.fits else "no: " + ", ".join(m.label for m in r.verdict.misses)


def rows(results: list[VariantResult], winner: str | None = None, tracking_uri: str = "",
         experiment_id: str | None = None) -> list[dict]:
    """One row per variant, sizes in kB/MB, the winner marked, the MLflow run as a full URL
    (its id where the tracking store has no UI)."""
    out = []
    for r in results:
        rep = r.report
        out.append({
            "variant": f"{WINNER_MARK} {r.name}" if r.name == winner else r.name,
            "fits": _fits(r),
            "quality": _num(rep.quality if rep else None, 4),
            "size": human_size(rep.size_bytes if rep else None),
            "p50 ms": _num(rep.latency_p50_ms if rep else None, 3),
            "p95 ms": _num(rep.latency_p95_ms if rep else None, 3),
            "peak memory MB": _num(rep.peak_memory_bytes / MB if rep else None, 2),
            "energy mJ": _num(rep.energy_mj if rep else None, 4),
            "cache": "hit" if r.cache_hit else "",
            "MLflow run": run_url(tracking_uri, experiment_id, r.run_id) or (r.run_id or "-"),
        })
    return out


def markdown_table(table: list[dict]) -> str:
    """A Markdown table of ``rows``; MLflow run URLs become links."""
    if not table:
        return ""
    head = list(table[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [f"[run]({v})" if k == "MLflow run" and str(v).startswith("http") else str(v).replace("|", "/")
                 for k, v in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winner_lines(winner: VariantResult | None, sel: Selection, url: str | None) -> list[str]:
    """What the winner measures and where its MLflow run is, as Markdown lines (why it won is the
    headline's: the selection rule and the runner-up)."""
    if winner is None or winner.report is None:
        return []  # the headline names the nearest misses
    rep = winner.report
    run = f"[{winner.run_id}]({url})" if url else f"`{winner.run_id}`"
    return [
        f"## {WINNER_MARK} {winner.name}",
        "",
        (f"- Quality {_num(rep.quality, 4)}; size {human_size(rep.size_bytes)} shipped "
         f"({human_size(rep.raw_size_bytes)} uncompressed, {rep.artifact_format})"),
        (f"- Latency p50 {rep.latency_p50_ms:.3f} ms, p95 {rep.latency_p95_ms:.3f} ms ({rep.threads} thread(s)); "
         f"peak memory {rep.peak_memory_bytes / MB:.2f} MB; energy {rep.energy_mj:.4f} mJ per inference ({rep.energy_source})"),
        f"- MLflow run: {run}",
    ]


def summary_markdown(headline: str, results: list[VariantResult], teacher: VariantResult, sel: Selection,
                     tracking_uri: str, experiment_id: str | None, flow_run_id: str | None,
                     flow_run_url: str | None) -> str:
    """The sweep explained: the headline (promotion), the winner and why, the variants table."""
    winner = next((r for r in results if r.name == sel.winner), None)
    run = "this process (no Prefect API)" if not flow_run_id else \
        (f"[{flow_run_id}]({flow_run_url})" if flow_run_url else f"`{flow_run_id}`")
    hits = sum(r.cache_hit for r in results)
    lines = [headline, "", *winner_lines(winner, sel, run_url(tracking_uri, experiment_id, winner and winner.run_id)), "",
             (f"Variants: {len(results)}, fitting the budget: {len(sel.fitting)}, cache hits: {hits} "
              f"(reused from an earlier identical run). Prefect flow run: {run}."
              + (f" [Every run in MLflow]({url})." if (url := experiment_url(tracking_uri, experiment_id)) else "")), "",
             markdown_table(rows([teacher, *results], sel.winner, tracking_uri, experiment_id))]
    return "\n".join(lines)


def _legend(fig, axes) -> None:
    """One legend for both panels, below them, so it hides no point."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)


def _place_labels(ax, points: list[tuple[float, float, str]]) -> None:
    """Label ``points`` without overlaps: each label takes the first offset around its point that
    stays inside the axes and clear of every marker and earlier label."""
    ax.figure.canvas.draw()
    frame = ax.get_window_extent()
    markers = [ax.transData.transform(xy) for c in ax.collections for xy in c.get_offsets()]
    placed: list[tuple[float, float, float, float]] = [(x - 5, y - 5, x + 5, y + 5) for x, y in markers]
    offsets = [(6, 6), (6, -12), (-6, 6), (-6, -12), (6, 18), (6, -24), (-6, 18), (-6, -24), (6, 30), (6, -36)]
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0])):
        px, py = ax.transData.transform((x, y))
        w, h = 5.2 * len(text) + 4, 11  # about 7-point text at 110 dpi, in pixels
        for dx, dy in offsets:
            left = px + dx if dx > 0 else px + dx - w
            box = (left, py + dy - 2, left + w, py + dy + h)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    ha="left" if dx > 0 else "right", va="bottom",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if abs(dy) > 12 else None)


def _panel(ax, measured, teacher, sel, attr, scale, label, limit, unit, front) -> list[tuple[float, float, str]]:
    """Plot one panel; returns the points to label (the front, the winner, the runner-up, the teacher)."""
    pts = {r.name: (getattr(r.report, attr) * scale, r.report.quality or 0.0) for r in measured}
    for r in measured:
        x, y = pts[r.name]
        if r.name == sel.winner:
            ax.scatter([x], [y], marker="*", s=260, c="tab:red", edgecolors="black", zorder=5, label=f"winner: {r.name}")
        elif r is teacher:
            ax.scatter([x], [y], marker="s", s=70, c="black", zorder=4, label="teacher")
        else:
            ax.scatter([x], [y], marker="o", s=36, zorder=3, c="tab:blue" if r.fits else "tab:gray",
                       label="fits the budget" if r.fits else "misses the budget")
    line = sorted(pts[n] for n in front if n in pts)
    if line:
        ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="tab:green", lw=1.2, alpha=0.8,
                label="Pareto front")
    if limit is not None:
        ax.axvline(limit, color="tab:red", linestyle="--", lw=1, label=f"{label.split(' (')[0]} budget {limit:g} {unit}")
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.12)
    ax.set_xlabel(label)
    ax.set_ylabel("quality")
    ax.grid(True, which="both", alpha=0.2)
    named = set(front) | {teacher.name} | {n for n in (sel.winner, sel.runner_up) if n}
    return [(*pts[n], n) for n in sorted(named) if n in pts]


def pareto_png(results: list[VariantResult], teacher: VariantResult, sel: Selection, limits: Budget, path: Path) -> Path:
    """Quality against shipped size and against p50 latency: the front as a step line, only the
    front, the winner and the teacher labelled, budget lines with their units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.report] + [teacher]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    labels = {}
    for ax, attr, scale, label, limit, unit, front in (
        (axes[0], "size_bytes", 1 / MB, "size (MB, shipped)", limits.max_size_mb, "MB", sel.pareto_size),
        (axes[1], "latency_p50_ms", 1.0, "latency p50 (ms)", limits.max_latency_ms, "ms", sel.pareto_latency),
    ):
        labels[ax] = _panel(ax, measured, teacher, sel, attr, scale, label, limit, unit, front)
        if limits.max_quality_drop is not None and teacher.report.quality is not None:
            floor = teacher.report.quality - limits.max_quality_drop
            ax.axhline(floor, color="tab:orange", linestyle=":", label=f"quality floor {floor:.3f}")
    fig.suptitle(f"winner: {sel.winner or 'none fits'}" + (f"  (runner-up: {sel.runner_up})" if sel.runner_up else ""))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _legend(fig, axes)
    for ax, points in labels.items():  # last: placed in the final pixel layout
        _place_labels(ax, points)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def search_markdown(study: str, numbers: dict[str, float], space: str, trials: list, front: list[VariantResult],
                    sel: Selection) -> str:
    """The search as a person reads it: the space, how the trials ended, and the Pareto front over
    quality, shipped size and p50 (the winner marked)."""
    trial_of = {t.recipe.name: t.number for t in trials if t.recipe is not None}
    lines = [f"# Search `{study}`", "", f"Space: {space}.", "",
             "Trials: " + ", ".join(f"{k.removeprefix('trials_').replace('_', ' ')} {v:g}" for k, v in numbers.items()
                                    if k.startswith("trials_")) + ".", "",
             "## Pareto front (quality, size, p50)", "",
             "| trial | variant | quality | size | p50 (ms) | fits |", "|---|---|---|---|---|---|"]
    for r in front:
        mark = f" {WINNER_MARK}" if r.name == sel.winner else ""
        lines.append(f"| {trial_of.get(r.name, 'seed')} | {r.name}{mark} | {_num(r.report.quality, 4)} | "
                     f"{human_size(r.report.size_bytes)} | {_num(r.report.latency_p50_ms, 3)} | {_fits(r)} |")
    return "\n".join(lines)


@task(name="report", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def report_task(parent_run_id: str, results: list[VariantResult], teacher: VariantResult, sel: Selection,
                limits: Budget, summary: str) -> str:
    """Plot and describe the sweep on the MLflow parent run, and publish the Prefect artifacts.
    Returns the summary as Markdown."""
    c = tracking.client()
    exp_id = tracking.retrying(c.get_run, parent_run_id).info.experiment_id
    uri = tracking.use_tracking_uri()
    ui = flow_run.get_flow_run_ui_url() if flow_run.get_id() else None
    text = summary_markdown(summary, results, teacher, sel, uri, exp_id, flow_run.get_id(),
                            ui if ui and ui.startswith("http") else None)  # no UI URL set: the id alone
    with tempfile.TemporaryDirectory() as tmp:
        png = pareto_png(results, teacher, sel, limits, Path(tmp) / "pareto.png")
        tracking.retrying(c.log_artifact, parent_run_id, str(png))
    tracking.describe_run(parent_run_id, text + "\n\nThe Pareto plot is this run's artifact `pareto.png`.")
    create_table_artifact(rows([teacher, *results], sel.winner, uri, exp_id), key="variants",
                          description=f"Every variant of this sweep ({WINNER_MARK} = winner)")
    create_markdown_artifact(text, key="summary", description="Winner, why it won, and where it went")
    return text
