"""Load: a 32-variant sweep on 2 Dask worker processes, into the MLflow server on PostgreSQL
with S3 artifacts, and into the embedded SQLite default. Nothing lost, nothing retried for a
locked database, every variant exactly once."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from shrinkflow.specs import SweepSpec, parse

pytestmark = pytest.mark.integration

RECIPES = [{"name": f"kd-w{w}-e{e}", "steps": [{"kind": "distill", "width": w / 100, "epochs": e}]}
           for w in (25, 50, 75, 100) for e in (1, 2, 3, 4)]
RECIPES += [{"name": f"prune-{r}-e{e}", "steps": [{"kind": "prune", "ratio": r / 100, "finetune": {"epochs": e}}]}
            for r in (30, 50, 70, 90) for e in (1, 2)]
RECIPES += [{"name": f"kd-w{w}+{q}", "steps": [{"kind": "distill", "width": w / 100, "epochs": 2},
                                              {"kind": "quantize", "scheme": q}]}
            for w in (50, 100) for q in ("int8-dynamic", "int8-weight-only", "fp16", "bf16")]
assert len(RECIPES) == 32


def _sweep(name: str):
    from flows.compress import run

    spec = parse(SweepSpec, {"name": name, "workload": "tests.unit.plugin_workload:make", "device": "rpi4",
                             "runner": "dask", "workers": 2, "budget": {"max_quality_drop": 1.0}, "recipes": RECIPES})
    return run(spec)


def _check(client: MlflowClient, name: str, outcome) -> None:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert sorted(r.info.run_name for r in children) == sorted(["teacher"] + [r["name"] for r in RECIPES])  # none lost, none twice
    assert all(r.info.status == "FINISHED" and "quality" in r.data.metrics for r in children)
    assert len({r.data.tags["host_pid"] for r in children if r.info.run_name != "teacher"}) == 2
    assert sum(r.data.metrics["tracking_retries"] for r in children) == 0  # no locked database, no lost request
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["tracking_retries"] == 0
    assert not any(v.skipped and v.skipped.startswith("failed") for v in outcome.variants)


def test_32_variants_on_2_workers_into_mlflow_on_postgres(stack, stack_env, monkeypatch):
    url = stack_env["MLFLOW_TRACKING_URI"]  # the session's MLflow server, on PostgreSQL with S3 artifacts
    assert stack["mlflow_backend"].startswith("postgresql")
    monkeypatch.setenv("SHRINKFLOW_ARTIFACT_STORE", "s3://shrinkflow-store/load")
    outcome = _sweep("load-postgres")
    _check(MlflowClient(url), "load-postgres", outcome)
    assert "database is locked" not in stack["mlflow"].tail(100_000)


def test_32_variants_on_2_workers_into_the_embedded_sqlite_default(stack, stack_env, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded default: sqlite under SHRINKFLOW_HOME
    monkeypatch.delenv("SHRINKFLOW_ARTIFACT_STORE")  # and a local artifact directory
    from tasks import config

    outcome = _sweep("load-sqlite")
    assert config.tracking_uri().startswith("sqlite:///")
    _check(MlflowClient(config.tracking_uri()), "load-sqlite", outcome)
