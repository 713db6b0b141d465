"""Several variant tasks log at once into the embedded SQLite store; nothing is lost.

Uses a workload defined outside the package (tests/unit/plugin_workload.py), by import path.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from shrinkflow.specs import SweepSpec, parse

pytestmark = pytest.mark.integration


def test_parallel_variants_into_sqlite_lose_nothing(stack, stack_env, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded default: sqlite under SHRINKFLOW_HOME
    monkeypatch.delenv("SHRINKFLOW_ARTIFACT_STORE")  # the embedded default: a local directory
    from flows.compress import run
    from tasks import config, storage

    recipes = [{"name": f"kd-w{w}-e{e}", "steps": [{"kind": "distill", "width": w / 100, "epochs": e}]}
               for w in (25, 50, 75) for e in (3, 6)]
    recipes += [{"name": "int8-dynamic", "steps": [{"kind": "quantize", "scheme": "int8-dynamic"}]},
                {"name": "prune-50", "steps": [{"kind": "prune", "ratio": 0.5, "finetune": {"epochs": 2}}]}]
    spec = parse(SweepSpec, {"name": "parallel", "workload": "tests.unit.plugin_workload:make", "device": "rpi4",
                             "budget": {"max_quality_drop": 1.0}, "recipes": recipes, "workers": 2, "runner": "processes"})
    outcome = run(spec)

    assert config.tracking_uri().startswith("sqlite:///")
    client = MlflowClient(config.tracking_uri())
    exp = client.get_experiment_by_name("parallel")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(["teacher"] + [r["name"] for r in recipes])  # exactly one run each, none lost
    assert all(r.info.status == "FINISHED" and "quality" in r.data.metrics for r in children)
    assert len({r.data.tags["host_pid"] for r in children if r.info.run_name != "teacher"}) == 2  # two worker processes

    assert outcome.promotion and outcome.promotion.promoted, outcome.promotion
    store = storage.open_store(config.store_uri())
    manifest, files = storage.fetch_verified(store, f"plugin-rpi4/v{outcome.promotion.version}/manifest.json")
    assert manifest["registry_name"] == "plugin-rpi4" and set(files) == {"model.pt2.xz"}
    assert json.loads((config.home() / "artifacts" / "plugin-rpi4" / "champion.json").read_text())["version"] == outcome.promotion.version
