"""Where a sweep's variants run: one in-process thread, a local Dask cluster, or a cluster by address.

The compress flow owns its variant runner (instead of a subflow whose task runner is picked from
the parameters), so a sweep is one flow run. A local cluster's workers are forked from a
forkserver that has imported what a variant needs (torch, prefect, mlflow, the core) once, while
the teacher runs, instead of each worker importing it all on a 2-core machine at the same time.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner

from shrinkflow.specs import SweepSpec
from tasks import config, tracking

log = logging.getLogger(__name__)

#: What the forkserver imports once for every local worker: the variant task's module and the
#: modules a variant imports lazily (torch.export and dynamo, torchao, MLflow's SQL stores).
FORKSERVER_PRELOAD = ["distributed", "prefect_dask", "tasks.compress", "tasks.warm_imports"]

#: Dask settings inside local workers: no statistical profiler sampling every worker thread every 10 ms.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}

#: The environment a local worker starts with: Dask's single-threaded BLAS/OpenMP settings, but not
#: its MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand every freed tensor back to the kernel;
#: training then page-faults its memory back in (26x the page faults, +27% wall on a digits sweep).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

#: Dask settings in this process while it starts a local cluster.
CLUSTER_CONFIG = {"distributed.nanny.pre-spawn-environ": WORKER_ENV}

#: Unix; elsewhere local workers are spawned (each imports what it needs itself).
FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()

_forkserver_env: tuple | None = None
_forkserver_lock = threading.Lock()


def _env_key() -> tuple:
    """What a forked worker inherits from the forkserver: the environment, sys.path and cwd at its start."""
    ignored = set(WORKER_ENV) | {"PYTHONHASHSEED", "MALLOC_TRIM_THRESHOLD_"}  # what each Nanny sets
    return tuple(sorted((k, v) for k, v in os.environ.items() if k not in ignored)), tuple(sys.path), os.getcwd()


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """os.environ as a local worker should start with, for starting the forkserver (which reads
    its malloc and OpenMP settings once, at exec). Restored after."""
    saved = {k: os.environ.get(k) for k in (*WORKER_ENV, "MALLOC_TRIM_THRESHOLD_")}
    os.environ.update(WORKER_ENV)
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_forkserver() -> None:
    """Start (or restart, if the environment changed since) the forkserver local workers fork from.

    Workers forked from it inherit its environment, not the flow process's at cluster start, so a
    changed environment (another SHRINKFLOW_HOME, PREFECT_API_URL, MLflow URI) restarts it.
    """
    global _forkserver_env
    import multiprocessing.forkserver

    with _forkserver_lock:
        key = _env_key()
        server = multiprocessing.forkserver._forkserver
        alive = server._forkserver_pid is not None
        if alive and key == _forkserver_env:
            return
        if alive:
            log.info("environment changed since the forkserver started: restarting it")
            server._stop()
        multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
        with _worker_environment():
            server.ensure_running()
        _forkserver_env = key


def prestart(spec: SweepSpec) -> None:
    """Start the forkserver now, in the background, if the spec asks for a local cluster: its
    imports then overlap whatever comes before the flow (starting a local Prefect API, say).
    Call it once the environment is as the flow will see it; a later change restarts it."""
    if FORKSERVER and spec.runner == "dask" and not spec.dask_address:
        tracking.use_tracking_uri()  # exported before the forkserver copies the environment
        threading.Thread(target=_prestart, name="forkserver-start", daemon=True).start()


def _prestart() -> None:
    try:
        ensure_forkserver()
    except Exception as exc:  # noqa: BLE001 - starting the cluster tries again, and raises there
        log.warning("starting the forkserver in the background failed: %r", exc)


def stop_forkserver() -> None:
    """Stop the forkserver (the next local cluster starts a fresh one)."""
    global _forkserver_env
    if not FORKSERVER:
        return
    import multiprocessing.forkserver

    with _forkserver_lock:
        multiprocessing.forkserver._forkserver._stop()
        _forkserver_env = None


def variant_runner(spec: SweepSpec) -> TaskRunner:
    """Dask (a local cluster of worker processes, or an existing cluster), or one in-process thread."""
    if spec.runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if spec.dask_address:
        return DaskTaskRunner(address=spec.dask_address)
    local = {"n_workers": spec.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
             "silence_logs": logging.ERROR, "local_directory": str(config.home() / "dask"),
             "preload": ["tasks.compress"],  # already imported by the forkserver; kept for a spawned worker
             "config": WORKER_CONFIG}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local)


class RunnerLifetime:
    """The variant runner, with a local cluster started and closed in background threads.

    A local cluster starts while the teacher runs, its workers forked from a forkserver started
    at the same time; it closes while promotion and the report run. With the threads runner or
    a cluster joined by address there is nothing to start or close.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.runner = variant_runner(spec)
        self.local = spec.runner == "dask" and not spec.dask_address
        self.threads: list[threading.Thread] = []
        self.cluster_up = threading.Event()  # set once starting the local cluster has succeeded or failed

    def _background(self, fn: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=fn, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def start(self) -> None:
        tracking.use_tracking_uri()  # this sweep's, exported for the workers before any starts
        self.runner.__enter__()
        if self.local:
            self._background(self._start, "dask-cluster-start")
        else:
            self.cluster_up.set()

    def map(self, task: Task, items: list, name: Callable[[Any], str], parameters: Callable[[Any], dict]) -> dict[str, PrefectFuture]:
        """Submit ``task`` once per item, in order, once a local cluster is up; futures by ``name(item)``.

        Every variant runs on the runner the spec asks for, never in the flow process, so a crash
        in one (a native kernel, say) takes down a worker, not the sweep. If the cluster failed to
        start, the first submit tries again and raises.
        """
        self.cluster_up.wait()
        return {name(item): self.runner.submit(task, parameters(item)) for item in items}

    def release(self) -> None:
        """Close a local cluster once every result is in, off the critical path."""
        if self.local:
            self._background(self._close, "dask-cluster-close")

    def _start(self) -> None:
        import dask

        try:
            if FORKSERVER:
                ensure_forkserver()
            method = {"distributed.worker.multiprocessing-method": "forkserver" if FORKSERVER else "spawn"}
            with dask.config.set({**CLUSTER_CONFIG, **method}):
                self.runner.client  # noqa: B018 - the property creates the cluster and the client
        except Exception as exc:  # noqa: BLE001 - the first submit raises it again, in the flow
            log.warning("starting the Dask cluster in the background failed: %r", exc)
        finally:
            self.cluster_up.set()

    def _close(self) -> None:
        self.runner.__exit__(None, None, None)

    def stop(self) -> None:
        for thread in self.threads:
            thread.join()
        if not self.local or not any(t.name == "dask-cluster-close" for t in self.threads):
            self.runner.__exit__(None, None, None)


@contextlib.contextmanager
def runner_lifetime(spec: SweepSpec) -> Iterator[RunnerLifetime]:
    """A started :class:`RunnerLifetime`; on exit every background thread is joined and the runner stopped."""
    lifetime = RunnerLifetime(spec)
    lifetime.start()
    try:
        yield lifetime
    finally:
        lifetime.stop()
