"""What a person reads about a sweep: the variants table, the summary and the Pareto plot."""

from __future__ import annotations

import pytest

from shrinkflow.select import select
from shrinkflow.specs import Budget, Miss, Report, VariantResult, Verdict


def _result(name: str, quality: float, size: int, p50: float, fits: bool = True, run: str | None = None,
            cache_hit: bool = False) -> VariantResult:
    report = Report(quality=quality, size_bytes=size, raw_size_bytes=size * 3, params=1000, nonzero_params=900,
                    sparsity=0.1, macs=5000, latency_p50_ms=p50, latency_p95_ms=p50 * 1.3,
                    peak_memory_bytes=2_500_000, energy_mj=0.0123, energy_source="estimated", threads=1,
                    artifact_format="torch.export")
    verdict = Verdict(fits=True) if fits else Verdict(fits=False, misses=(Miss(limit="max_size_mb", value=0.5, allowed=0.4),))
    return VariantResult(name=name, report=report, verdict=verdict, run_id=run or f"run-{name}", cache_hit=cache_hit)


@pytest.fixture
def sweep():
    """A sweep shaped like the one in the field: a cluster of near-equal variants, one far larger."""
    teacher = _result("teacher", 0.9722, 1_900_000, 9.0, fits=False)
    variants = [_result("prune-global-60", 0.9667, 394_160, 1.10),
                _result("kd-w50+prune-channels-30+ft+int8-static", 0.9667, 34_552, 0.60, cache_hit=True),
                _result("kd-w25", 0.9611, 30_100, 0.55), _result("kd-w25+int8-static", 0.9583, 12_000, 0.58),
                _result("kd-w50", 0.9639, 60_500, 0.70), _result("kd-w50+int8-dynamic", 0.9630, 36_000, 0.62),
                _result("prune-channels-50", 0.9500, 500_000, 1.5, fits=False),
                VariantResult(name="prune-global-30", skipped="needs a GPU")]
    return teacher, variants, select(variants)


def test_rows_give_sizes_in_kb_mb_peak_memory_and_a_winner_mark(sweep):
    from tasks.report import WINNER_MARK, human_size, rows

    teacher, variants, sel = sweep
    assert sel.winner == "kd-w50+prune-channels-30+ft+int8-static"  # same quality, 11x smaller
    table = rows([teacher, *variants], sel.winner, "http://127.0.0.1:5000/", "7")
    by_name = {r["variant"].removeprefix(WINNER_MARK).strip(): r for r in table}
    assert by_name[sel.winner]["variant"] == f"{WINNER_MARK} {sel.winner}"
    assert by_name["prune-global-60"]["size"] == "394.2 kB" and by_name["teacher"]["size"] == "1.90 MB"
    assert by_name["kd-w25"]["peak memory MB"] == "2.50" and by_name["kd-w25"]["p50 ms"] == "0.550"
    assert by_name["kd-w25"]["MLflow run"] == "http://127.0.0.1:5000/#/experiments/7/runs/run-kd-w25"
    assert by_name[sel.winner]["cache"] == "hit"
    assert by_name["prune-channels-50"]["fits"] == "no: max_size_mb"
    assert by_name["prune-global-30"]["fits"].startswith("skipped") and by_name["prune-global-30"]["size"] == "-"
    assert human_size(999) == "1.0 kB" and human_size(2_345_678) == "2.35 MB"
    local = rows(variants[:1], None, "sqlite:////tmp/mlflow.db", "7")
    assert local[0]["MLflow run"] == "run-prune-global-60"  # no UI to link to: the id, whole


def test_summary_says_who_won_why_and_links_every_run(sweep):
    from flows.compress import _summary
    from shrinkflow.specs import SweepSpec
    from tasks.report import summary_markdown

    teacher, variants, sel = sweep
    headline = _summary(SweepSpec(), sel, None)
    text = summary_markdown(headline, variants, teacher, sel, "http://mlflow:5000", "3", "abc-123",
                            "http://prefect:4200/flow-runs/flow-run/abc-123")
    assert sel.why in text and sel.rule in text and f"runner-up: {sel.runner_up}" in text
    assert "34.6 kB" in text and "p50 0.600 ms, p95 0.780 ms" in text and "peak memory 2.50 MB" in text
    assert "energy 0.0123 mJ" in text and "cache hits: 1" in text
    assert "[abc-123](http://prefect:4200/flow-runs/flow-run/abc-123)" in text and "Flow run: None" not in text
    assert text.count("](http://mlflow:5000/#/experiments/3/runs/run-") == 9  # the winner line and 8 table rows
    assert "| ★ kd-w50+prune-channels-30+ft+int8-static |" in text


def test_pareto_plot_is_written(sweep, tmp_path):
    from tasks.report import pareto_png

    teacher, variants, sel = sweep
    path = pareto_png(variants, teacher, sel, Budget(max_size_mb=0.4, max_latency_ms=5.0, max_quality_drop=0.02),
                      tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_experiment_link_opens_the_runs_as_model_training():
    from tasks.report import experiment_url

    assert experiment_url("http://127.0.0.1:14201/", "4") == \
        "http://127.0.0.1:14201/#/experiments/4/runs?workflowType=machine_learning"
    assert experiment_url("sqlite:///x/mlflow.db", "4") is None  # no UI to link to
