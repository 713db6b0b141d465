"""Where variants run: what local Dask workers start with, submission order, the tracking URI."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from flows import runners
from shrinkflow.specs import SweepSpec

ROOT = Path(__file__).resolve().parents[2]


def test_local_workers_inherit_the_current_environment_without_dask_malloc_trim(monkeypatch, tmp_path):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "one"))
    spec = SweepSpec(device="rpi4", runner="dask", workers=1)
    with runners.started(spec) as variants:
        variants.cluster_up.result(timeout=300)
        client = variants.runner.client
        env = {name: list(client.run(os.getenv, name).values())
               for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "SHRINKFLOW_HOME", "MLFLOW_TRACKING_URI")}
        # Dask's housekeeping timers (ms), in the scheduler, the Nanny and the worker process
        timers = {"scheduler": client.run_on_scheduler(_timers),
                  "nanny": [_timers(nanny) for nanny in client.cluster.workers.values()],
                  "worker": list(client.run(_timers).values())}
    assert env == {"MALLOC_TRIM_THRESHOLD_": [None], "OMP_NUM_THREADS": ["1"], "SHRINKFLOW_HOME": [str(tmp_path / "one")],
                   "MLFLOW_TRACKING_URI": [f"sqlite:///{tmp_path / 'one' / 'mlflow.db'}"]}  # exported before it started
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ  # this process's environment does not gain it either
    assert timers == {"scheduler": {"tick": 1000, "monitor": 2000},
                      "nanny": [{"tick": 1000, "monitor": 2000, "memory_monitor": 1000}],
                      "worker": [{"tick": 1000, "monitor": 2000, "memory_monitor": 1000}]}  # Dask: 20, 500, 100
    assert variants.cluster_closed is not None and variants.cluster_closed.done()


def test_a_released_local_cluster_is_waited_for_until_its_workers_have_exited(tmp_path, monkeypatch):
    """Released while the flow promotes and reports, the cluster has closed by the time the flow
    leaves its runner: no worker process left running."""
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    with runners.started(SweepSpec(device="rpi4", runner="dask", workers=1)) as variants:
        variants.cluster_up.result(timeout=300)
        pids = list(variants.runner.client.run(os.getpid).values())
        variants.release()
    assert variants.cluster_closed.done() and variants.cluster_closed.exception() is None
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # exited and reaped by its Nanny
            os.kill(pid, 0)


def test_processes_freeze_their_objects_before_exiting(monkeypatch):
    """A worker closing and the `shrinkflow` command returning freeze what the interpreter would
    otherwise collect on its way out (seconds of CPU with torch, Prefect and MLflow loaded)."""
    import gc
    import importlib

    from flows import cli

    compress = importlib.import_module("tasks.compress")
    gc.unfreeze()
    try:
        compress.dask_teardown(None)
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        monkeypatch.setattr(cli, "main", lambda argv=None: 3)
        assert cli.entry() == 3 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    from importlib.metadata import entry_points

    assert entry_points(group="console_scripts")["shrinkflow"].value == "flows.cli:entry"


def _timers(dask_server=None, dask_scheduler=None, dask_worker=None) -> dict[str, float]:
    """The periods (ms) of a Dask server's housekeeping callbacks: event-loop health check, system
    monitor, memory check (``client.run`` passes the server by its keyword)."""
    server = dask_server or dask_scheduler or dask_worker
    return {name: pc.callback_time for name, pc in server.periodic_callbacks.items()
            if name in ("tick", "monitor", "memory_monitor")}


def test_longest_training_is_submitted_first():
    from flows.compress import longest_first
    from shrinkflow.workloads.digits import default_recipes

    order = [r.name for r in longest_first(tuple(default_recipes()))]
    assert order.index("kd-w50") < order.index("prune-global-60") < order.index("int8-static")
    assert order[-1] in {"int8-dynamic", "int8-weight-only", "int8-static", "int8-static-local", "fp16"}


def test_workers_get_this_sweeps_tracking_uri_not_one_an_earlier_sweep_exported(monkeypatch, tmp_path):
    from tasks import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored (unset) after the test
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "one"))
    tracking.use_tracking_uri()  # an earlier sweep in this process: MLflow exports its URI
    assert os.environ["MLFLOW_TRACKING_URI"].startswith(f"sqlite:///{tmp_path / 'one'}")
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "two"))
    with runners.started(SweepSpec(device="rpi4", runner="threads")):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"


def test_runners_use_public_apis_only():
    """No CPython multiprocessing internals, no hand-called context-manager methods, no environment
    writes: what the runner needs from Dask goes through its config."""
    tree = ast.parse((ROOT / "flows" / "runners.py").read_text())
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not attributes & {"__enter__", "__exit__", "_forkserver", "_forkserver_pid", "_stop", "environ"}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"multiprocessing", "threading", "os"} & imported
    assert runners.CLUSTER_CONFIG == {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def test_measuring_takes_a_workers_share_of_the_cores_and_never_more_than_half(monkeypatch):
    """Other load on the host (the flow's own server, another job) must find a free core rather
    than share one with a timed thread, whichever runner measures."""
    import importlib

    compress, measure = importlib.import_module("tasks.compress"), importlib.import_module("shrinkflow.measure")
    monkeypatch.setattr(compress, "host_cores", lambda: 8)
    assert compress.worker_threads(SweepSpec(device="rpi4", runner="threads")) == 4
    assert compress.worker_threads(SweepSpec(device="rpi4", runner="dask", workers=1)) == 4
    assert compress.worker_threads(SweepSpec(device="rpi4", runner="dask", workers=4)) == 2
    assert compress.worker_threads(SweepSpec(device="rpi4", runner="dask", workers=16)) == 1
    monkeypatch.setattr(compress, "host_cores", lambda: 1)
    assert compress.worker_threads(SweepSpec(device="rpi4", runner="threads")) == 1
    assert measure.host_cores() == len(os.sched_getaffinity(0))  # a taskset or cpuset narrows it


def test_dask_hashes_a_prefect_flow_by_name_without_pickling_it():
    """prefect-dask lets Dask hash each submission, the flow run's context among it; a Flow is
    named, not serialised by value, and two flows still hash apart."""
    import threading

    from dask.base import tokenize
    from prefect import flow

    lock = threading.Lock()  # cloudpickle cannot serialise it: hashing by value would give a random token

    @flow(name="one")
    def one() -> None:
        with lock:
            pass

    @flow(name="two")
    def two() -> None:
        pass

    runners.variant_runner(SweepSpec(device="rpi4", runner="dask", workers=2))  # registers the token
    assert tokenize(one) == tokenize(one) != tokenize(two)
    assert tokenize({"flow": one}) == tokenize({"flow": one})


def test_finalists_are_retimed_in_the_flows_process_when_the_runner_fails_or_nothing_was_measured(monkeypatch):
    from distributed.client import FutureCancelledError
    from prefect.logging import disable_run_logger

    from flows import compress
    from shrinkflow.specs import Report, VariantResult

    calls = []

    def retime_here(spec, teacher, results):  # what retime_task returns: the teacher and the records
        calls.append([r.name for r in results])
        return teacher, results

    class LostWorker:  # the runner's future for the re-timing task: its worker was lost
        def result(self):
            raise FutureCancelledError("retime-1", "lost")

    class Runner:
        def __init__(self) -> None:
            self.submitted = []

        def submit(self, fn, parameters):
            self.submitted.append(fn)
            return LostWorker()

    monkeypatch.setattr(compress, "retime_task", retime_here)
    report = Report(quality=0.9, size_bytes=1, raw_size_bytes=1, params=1, nonzero_params=1, sparsity=0.0, macs=1,
                    latency_p50_ms=1.0, latency_p95_ms=1.0, peak_memory_bytes=1, energy_mj=1.0,
                    energy_source="estimated", threads=1, artifact_format="torch.export")
    teacher = VariantResult(name="teacher", report=report, run_id="t")
    measured = [VariantResult(name="a", report=report, run_id="a"), VariantResult(name="b", skipped="failed: x")]
    spec = SweepSpec(device="rpi4")
    with disable_run_logger():
        runner = Runner()
        assert compress.retimed(spec, teacher, measured, runner) == (teacher, measured)
        assert runner.submitted == [retime_here] and calls == [["a", "b"]]  # tried on the runner, then here
        runner, calls[:] = Runner(), []
        nothing = [VariantResult(name="b", skipped="failed: x")]
        assert compress.retimed(spec, teacher, nothing, runner) == (teacher, nothing)
        assert runner.submitted == [] and calls == [["b"]]  # nothing measured: no round trip to the runner
