"""The budget-driven search against real servers (Prefect API, MLflow on PostgreSQL, S3, and the
Optuna studies in a schema of MLflow's PostgreSQL database): it finds a fitting variant where a bad
recipe list finds none, promotes it and logs its front; a killed run resumes from the study without
training its finished trials again; identical searches pick the same winner."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from distributed import WorkerPlugin
from mlflow import MlflowClient

from shrinkflow.specs import SweepSpec, parse

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = "tests.unit.plugin_workload:wide"
#: The teacher (68k parameters) cannot ship under 30 kB even as int8; students can.
BASE = {"workload": WORKLOAD, "device": "rpi4", "runner": "threads", "budget": {"max_size_mb": 0.03, "max_quality_drop": 0.1}}
SEARCH = {"trials": 3, "parallel": 1, "sampler": "random"}


def _study(spec: SweepSpec) -> optuna.Study:
    from tasks import search

    return optuna.load_study(study_name=search.study_name(spec), storage=search.storage())


def test_search_finds_what_bad_recipes_miss_and_a_killed_run_resumes(stack_env, tmp_path):
    from flows.compress import run

    # The hand-written list (int8 of the teacher: 68 kB) finds nothing under 30 kB; it seeds the search.
    bad = [{"name": "int8", "steps": [{"kind": "quantize", "scheme": "int8-dynamic"}]},
           {"name": "fp16", "steps": [{"kind": "quantize", "scheme": "fp16"}]}]
    data = {**BASE, "name": "searched", "registry_name": "search-model", "search": SEARCH, "recipes": bad}
    spec = parse(SweepSpec, data)
    (tmp_path / "spec.yaml").write_text(spec.model_dump_json())  # JSON is YAML
    log = tmp_path / "cli.log"
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "spec.yaml")],
                           env={**stack_env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, stdout=log.open("wb"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while True:  # kill the whole run (flow and workers) once its first trial is told
            assert time.monotonic() < deadline and cli.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(KeyError):  # the run has not created its study yet
                done = [t for t in _study(spec).get_trials(deepcopy=False) if t.state.is_finished()]
                if any(t.state == optuna.trial.TrialState.COMPLETE for t in done):
                    break
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
    before = {t.number: t for t in _study(spec).get_trials(deepcopy=False)}
    finished_before = {n for n, t in before.items() if t.state.is_finished()}

    outcome = run(spec)
    trials = {t.number: t for t in _study(spec).get_trials(deepcopy=False)}
    for n in finished_before:  # kept as they were: not asked or trained again
        assert trials[n].state == before[n].state and trials[n].params == before[n].params
    interrupted = [n for n, t in before.items() if not t.state.is_finished()]
    assert all(trials[n].state.name == "FAIL" and trials[n].user_attrs["note"].startswith("interrupted") for n in interrupted)
    trained = [t for t in trials.values() if t.state.name == "COMPLETE" and not t.user_attrs["note"].startswith("repeat")]
    assert len(trained) + sum(t.user_attrs["note"].startswith("pruned") for t in trials.values()) == SEARCH["trials"]
    assert outcome.timings["search_trials_trained"] == SEARCH["trials"]

    seeds = {v.name: v for v in outcome.variants if v.name in ("int8", "fp16")}
    assert len(seeds) == 2 and not any(v.fits for v in seeds.values())
    assert outcome.promotion and outcome.promotion.promoted and outcome.selection.winner
    winner = next(v for v in outcome.variants if v.name == outcome.selection.winner)
    assert winner.report.size_bytes <= 30_000 and winner.recipe.steps[0].kind == "distill"

    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("searched")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    tagged = {int(r.data.tags["search.trial"]): r.data.tags["search.state"] for r in runs if "search.trial" in r.data.tags}
    told_here = {n for n in trials if n not in finished_before}
    assert told_here <= set(tagged) and all(tagged[n] == trials[n].state.name for n in told_here)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["search_trials_trained"] == SEARCH["trials"]
    front = client.download_artifacts(outcome.parent_run_id, "search.md", str(tmp_path))
    text = open(front).read()
    assert "## Pareto front" in text and f"{winner.name} ★" in text


class SlowStarts(WorkerPlugin):
    """On the worker at ``slow``: every task starts ``seconds`` late (the others run as they are)."""

    def __init__(self, slow: str, seconds: float) -> None:
        self.slow, self.seconds, self.here = slow, seconds, None

    def setup(self, worker) -> None:
        self.here = worker.address

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and self.here == self.slow:
            time.sleep(self.seconds)


def test_identical_searches_pick_the_same_winner(stack_env, dask_cluster):
    """Two workers with two one-trial batches in flight, the pruner on (torch programs only: an
    ExecuTorch build takes about 20 s here and says nothing of the order): the first search with one
    worker slow (its prefixes trained here), the second with the other worker slow (its prefixes
    found in the cache). How the workers' epochs interleave, and where a prefix came from, change
    nothing: the pruner judges a trial only against trials told before its batch was submitted."""
    from distributed import Client

    from flows.compress import run

    with Client(dask_cluster) as client:
        workers = sorted(client.scheduler_info()["workers"])
        outcomes, studies = [], []
        for name, slow in (("same-a", workers[0]), ("same-b", workers[1])):
            client.register_plugin(SlowStarts(slow, 0.5), name="slow-starts")
            spec = parse(SweepSpec, {**BASE, "name": name, "registry_name": f"same-{name}", "runner": "dask",
                                     "dask_address": dask_cluster, "workers": 2,
                                     "search": {"trials": 4, "parallel": 1, "epochs": 9, "runtime": "torch"}})
            outcomes.append(run(spec))
            studies.append([(t.number, t.state.name, t.params, t.values, t.intermediate_values, t.user_attrs["note"])
                            for t in _study(spec).get_trials(deepcopy=False)])
    assert studies[0] == studies[1]  # every trial: its number, state, recipe, score, validation curve, note
    assert outcomes[0].timings["prefixes_computed"] > 0 and outcomes[1].timings.get("prefixes_computed", 0) == 0
    a, b = ([v.recipe.model_dump(exclude={"name"}) for v in o.variants] for o in outcomes)
    assert a == b and len(a) >= 2  # the same trials, in the same order (TPE, seeded by the spec's seed)
    assert outcomes[0].selection.winner == outcomes[1].selection.winner is not None
