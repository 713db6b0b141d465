"""The sweep fanned out on Dask: a local cluster logging into the embedded SQLite store, and an
existing cluster joined by address; results match a threads run and a rerun resumes.

Uses a workload defined outside the package (tests/unit/plugin_workload.py), by import path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from shrinkflow import budget
from shrinkflow.specs import SweepSpec, parse

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

RECIPES = [{"name": f"kd-w{w}-e{e}", "steps": [{"kind": "distill", "width": w / 100, "epochs": e}]}
           for w in (25, 50, 75) for e in (3, 6)]
RECIPES += [{"name": "int8-dynamic", "steps": [{"kind": "quantize", "scheme": "int8-dynamic"}]},
            {"name": "prune-50", "steps": [{"kind": "prune", "ratio": 0.5, "finetune": {"epochs": 2}}]}]


def _spec(name, **kw):
    return parse(SweepSpec, {"name": name, "workload": "tests.unit.plugin_workload:make", "device": "rpi4",
                             "budget": {"max_quality_drop": 1.0}, "recipes": RECIPES, **kw})


def _children(client, exp_name, parent_run_id):
    exp = client.get_experiment_by_name(exp_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]


def test_local_dask_cluster_into_sqlite_matches_threads_and_loses_nothing(stack, stack_env, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded default: sqlite under SHRINKFLOW_HOME
    monkeypatch.delenv("SHRINKFLOW_ARTIFACT_STORE")  # the embedded default: a local directory
    from flows.compress import run
    from tasks import config, storage, tracking

    threaded = run(_spec("threads", runner="threads"))
    outcome = run(_spec("parallel", runner="dask", workers=2))

    assert config.tracking_uri().startswith("sqlite:///")
    client = MlflowClient(config.tracking_uri())
    children = _children(client, "parallel", outcome.parent_run_id)
    assert sorted(r.info.run_name for r in children) == sorted(["teacher"] + [r["name"] for r in RECIPES])  # none lost
    assert all(r.info.status == "FINISHED" and "quality" in r.data.metrics for r in children)
    workers = {r.data.tags["host_pid"] for r in children if r.info.run_name != "teacher"}
    assert len(workers) >= 2  # two workers
    # the finalists were timed again together on one of the workers, not in the flow's process
    retimed = {r.data.tags["retimed_host_pid"] for r in children if "retimed_host_pid" in r.data.tags}
    assert len(retimed) == 1 and retimed <= workers and tracking.host_pid() not in retimed
    assert {v.report.latency_runs for v in outcome.variants if v.name == outcome.selection.winner} == {30}
    threaded_children = _children(client, "threads", threaded.parent_run_id)
    assert {r.data.tags["retimed_host_pid"] for r in threaded_children if "retimed_host_pid" in r.data.tags} \
        == {tracking.host_pid()}  # the threads runner: this process

    # the sweep's tree: 7 distinct training prefixes (6 distillations, 1 prune) computed once by the
    # first sweep; the second sweep, in the same home, reuses every one of them
    assert (threaded.timings["prefixes_computed"], threaded.timings["prefixes_reused"]) == (7, 0)
    assert (outcome.timings["prefixes_computed"], outcome.timings["prefixes_reused"]) == (0, 7)
    by_name = {v.name: v.report for v in threaded.variants}
    for v in outcome.variants:  # bit-identical models whichever runner built them
        assert v.report.quality == by_name[v.name].quality and v.report.size_bytes == by_name[v.name].size_bytes, v.name

    store = storage.open_store(config.store_uri())
    key = f"plugin-rpi4/v{outcome.promotion.version}/manifest.json" if outcome.promotion.promoted else None
    if key:
        manifest, files = storage.fetch_verified(store, key)
        assert manifest["registry_name"] == "plugin-rpi4" and set(files) == {"model.pt2.xz"}
    pointer = json.loads((config.home() / "artifacts" / "plugin-rpi4" / "champion.json").read_text())
    assert pointer["version"] == outcome.promotion.champion_version


def test_existing_cluster_by_address_and_resume(stack, stack_env, dask_cluster):
    from flows.compress import run

    spec = _spec("cluster", runner="dask", dask_address=dask_cluster, workers=2)
    first = run(spec)
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    children = _children(client, "cluster", first.parent_run_id)
    assert sorted(r.info.run_name for r in children) == sorted(["teacher"] + [r["name"] for r in RECIPES])
    assert len({r.data.tags["host_pid"] for r in children if r.info.run_name != "teacher"}) == 2
    assert first.teacher_forward_samples > 0 and not any(v.cache_hit for v in first.variants)
    # two 1-thread workers on this host: each measures with half the cores (workers x threads <= cores)
    _, limits = budget.resolve("rpi4", None)
    assert {v.report.threads for v in first.variants if v.report} == {min(limits.threads, max(1, (os.cpu_count() or 1) // 2))}

    again = run(spec)  # a rerun: every variant is reused, the teacher does not run, no new child runs
    assert again.teacher_forward_samples == 0
    assert all(v.cache_hit for v in again.variants)
    assert [r.info.run_name for r in _children(client, "cluster", again.parent_run_id)] == ["teacher"]
    assert {v.name: v.run_id for v in again.variants} == {v.name: v.run_id for v in first.variants}
    assert client.get_run(again.parent_run_id).data.metrics["cache_hits"] == len(RECIPES)
