"""The forkserver local Dask workers fork from: what they inherit, and when it restarts."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from flows import runners


def _environ(queue) -> None:
    queue.put({k: os.environ.get(k) for k in ("SHRINKFLOW_HOME", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})


def _child_env() -> dict:
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    proc = ctx.Process(target=_environ, args=(queue,))
    proc.start()
    out = queue.get(timeout=120)
    proc.join(timeout=60)
    return out


@pytest.fixture
def fresh_forkserver():
    runners.stop_forkserver()
    yield
    runners.stop_forkserver()


def test_workers_inherit_the_current_environment_without_dask_malloc_trim(fresh_forkserver, monkeypatch, tmp_path):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # what a Dask Nanny leaves in the parent's environment
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "one"))
    runners.FORKSERVER_PRELOAD, saved = ["json"], runners.FORKSERVER_PRELOAD  # the environment, not the imports, is tested
    try:
        runners.ensure_forkserver()
        first = _child_env()
        pid = multiprocessing.forkserver._forkserver._forkserver_pid
        runners.ensure_forkserver()  # same environment: the same server
        assert multiprocessing.forkserver._forkserver._forkserver_pid == pid
        monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "two"))
        runners.ensure_forkserver()  # another home: a new server, or workers would write to the old one
        second = _child_env()
        assert multiprocessing.forkserver._forkserver._forkserver_pid != pid
    finally:
        runners.FORKSERVER_PRELOAD = saved
    assert first == {"SHRINKFLOW_HOME": str(tmp_path / "one"), "MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}
    assert second["SHRINKFLOW_HOME"] == str(tmp_path / "two")
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is left as it was


def test_longest_training_is_submitted_first():
    from flows.compress import longest_first
    from shrinkflow.workloads.digits import default_recipes

    order = [r.name for r in longest_first(tuple(default_recipes()))]
    assert order.index("kd-w50") < order.index("prune-global-60") < order.index("int8-static")
    assert order[-1] in {"int8-dynamic", "int8-weight-only", "int8-static", "int8-static-local", "fp16"}


def test_workers_get_this_sweeps_tracking_uri_not_one_an_earlier_sweep_exported(monkeypatch, tmp_path):
    from shrinkflow.specs import SweepSpec
    from tasks import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored (unset) after the test
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "one"))
    tracking.use_tracking_uri()  # an earlier sweep in this process: MLflow exports its URI
    assert os.environ["MLFLOW_TRACKING_URI"].startswith(f"sqlite:///{tmp_path / 'one'}")
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "two"))
    lifetime = runners.RunnerLifetime(SweepSpec(device="rpi4", runner="threads"))
    lifetime.start()
    lifetime.stop()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"
