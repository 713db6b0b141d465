"""Where a sweep's variants run: one in-process thread, a local Dask cluster, or a cluster by address.

The compress flow owns its variant runner (instead of a subflow whose task runner is picked from
the parameters), so a sweep is one flow run. A local cluster starts in a background thread while
tracking starts and the teacher runs, and closes when the flow is done with it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect import Flow, Task
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from shrinkflow.specs import SweepSpec
from tasks import config, tracking

log = logging.getLogger(__name__)

#: Dask's housekeeping timers in a local cluster's scheduler, Nannies and workers, slowed from
#: their defaults: the event-loop health check from every 20 ms to every second, the system
#: monitor (CPU, memory, network counters) from 500 ms to 2 s, the Nanny's and worker's memory
#: check from 100 ms to 1 s. Every process of the cluster wakes for each of them whether or not it
#: has work; on a host whose cores all train, that is CPU taken from the training (the flow
#: process, which hosts the scheduler and the Nannies, used 7.5 s of CPU over a fan-out run with
#: the defaults, 4.5 s with these, one run each). What slows with them: the dashboard's system
#: plots, and a worker over its memory limit is paused or restarted within a second, not 100 ms.
HOUSEKEEPING = {"distributed.admin.tick.interval": "1s", "distributed.admin.system-monitor.interval": "2s",
                "distributed.worker.memory.monitor-interval": "1s"}

#: Dask settings inside local workers: no statistical profiler sampling every worker thread every
#: 10 ms, and the housekeeping above.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False, **HOUSEKEEPING}

#: Dask settings while a local cluster starts. Its Nanny gives every worker Dask's
#: ``distributed.nanny.pre-spawn-environ`` (single-threaded BLAS/OpenMP, and
#: MALLOC_TRIM_THRESHOLD_=65536); a value of None takes a variable out (Dask's documented way).
#: The malloc setting makes glibc hand every freed tensor back to the kernel, and training then
#: page-faults its memory back in: 26x the page faults, 27% slower (docs/BENCHMARKS.md, fanout).
CLUSTER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def _prefect_token(obj: Flow | Task) -> tuple:
    """Dask's token for a Prefect flow or task: its name and its function's import path.

    prefect-dask submits every task with a key of Dask's choosing, so Dask hashes the call,
    the flow run's context among it. That holds the Flow object, which cloudpickle serialises by
    value, scanning every imported module once per global the flow function uses (with torch,
    MLflow and Prefect imported, 28-105 ms per submission; 16 submissions took 2.25 s of the flow's
    wall time, 1.48 s with this token, while the workers trained). Each submission carries a new
    task run id, so the key is unique whatever this token is; naming the object is enough."""
    fn = obj.fn
    return type(obj).__name__, obj.name, obj.version if isinstance(obj, Flow) else None, fn.__module__, fn.__qualname__


def variant_runner(spec: SweepSpec) -> TaskRunner:
    """Dask (a local cluster of worker processes, or an existing cluster), or one in-process thread."""
    if spec.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=1)
    from dask.base import normalize_token
    from prefect_dask import DaskTaskRunner

    normalize_token.register((Flow, Task), _prefect_token)

    if spec.dask_address:
        return DaskTaskRunner(address=spec.dask_address)
    local = {"n_workers": spec.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
             "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},  # its health endpoint: loopback, any free port
             "silence_logs": logging.ERROR, "local_directory": str(config.home() / "dask"),
             "preload": ["tasks.compress"],  # imports torch and readies its profiler in each worker's main thread
             "config": WORKER_CONFIG}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local)


class Variants:
    """A started variant runner; a local cluster may still be starting, and closes when released."""

    def __init__(self, runner: TaskRunner, pool: ThreadPoolExecutor | None = None,
                 cluster: contextlib.ExitStack | None = None) -> None:
        self.runner, self.pool, self.cluster = runner, pool, cluster
        self.cluster_up: Future | None = pool.submit(_create_cluster, runner) if pool else None
        self.cluster_closed: Future | None = None

    def submit(self, task: Task, parameters: dict, wait_for: list[PrefectFuture] | None = None) -> PrefectFuture:
        """Submit ``task`` once a local cluster is up, after the futures in ``wait_for``.

        Every step runs on the runner the spec asks for, never in the flow process, so a crash
        in one (a native kernel, say) takes down a worker, not the sweep. A cluster that failed to
        start raises its error here, in the flow.
        """
        if self.cluster_up is not None:
            self.cluster_up.result()
        return self.runner.submit(task, parameters, wait_for=wait_for or None)

    def map(self, task: Callable[[Any], Task], items: list, name: Callable[[Any], str],
            parameters: Callable[[Any], dict],
            wait_for: Callable[[Any], list[PrefectFuture]] = lambda item: []) -> dict[str, PrefectFuture]:
        """:meth:`submit` the task ``task(item)`` once per item, in order; futures by ``name(item)``."""
        return {name(item): self.submit(task(item), parameters(item), wait_for(item)) for item in items}

    def release(self) -> None:
        """Close a local cluster in the background, once every result is in, while the flow
        promotes and reports; leaving :func:`started` waits for it (its workers exited)."""
        if self.pool is not None and self.cluster_closed is None:
            self.cluster_closed = self.pool.submit(self.cluster.close)
            self.cluster_closed.add_done_callback(_warn_if_failed)


def _warn_if_failed(closed: Future) -> None:
    if closed.exception() is not None:  # the results are in: a cluster that fails to close costs nothing else
        log.warning("closing the local Dask cluster failed: %r", closed.exception())


def _create_cluster(runner: TaskRunner) -> None:
    runner.client  # noqa: B018 - prefect-dask creates the cluster and its client on first access


@contextlib.contextmanager
def started(spec: SweepSpec) -> Iterator[Variants]:
    """The spec's variant runner, started; on exit it is stopped (a local cluster closed).

    A local cluster is created in a background thread, so its workers start (and import torch,
    prefect and mlflow) while tracking starts and the teacher runs. Dask's config is set here,
    in the flow's thread, and restored once the cluster has started and closed.
    """
    tracking.use_tracking_uri()  # this sweep's, exported for the workers before any starts
    runner = variant_runner(spec)
    if spec.runner == "threads" or spec.dask_address:
        with runner:
            yield Variants(runner)
        return
    import dask

    with dask.config.set({**CLUSTER_CONFIG, **HOUSEKEEPING}), ThreadPoolExecutor(max_workers=1, thread_name_prefix="dask-cluster") as pool:
        cluster = contextlib.ExitStack()
        cluster.enter_context(runner)
        variants = Variants(runner, pool, cluster)
        try:
            yield variants
        finally:
            variants.release()  # the pool runs its jobs in order: start, then close; leaving it joins both
