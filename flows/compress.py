"""The compress flow: teacher once, variants fanned out, selection, promotion."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from shrinkflow import budget
from shrinkflow.select import select
from shrinkflow.specs import Selection, SweepResult, SweepSpec, VariantResult
from tasks import config, tracking
from tasks.compress import teacher_task, variant_task
from tasks.promote import PromotionOutcome, promote_task
from tasks.report import report_task


class SweepOutcome(SweepResult):
    """A sweep's result plus where it went: the promotion, the MLflow parent run, the flow run."""

    promotion: PromotionOutcome | None
    parent_run_id: str
    flow_run_id: str
    timings: dict[str, float]


#: What a local Dask worker imports as it starts: the variant task's module and what it pulls in.
PRELOAD = "tasks.compress"


def task_runner(spec: SweepSpec):
    """Dask (a local cluster of worker processes, or an existing cluster), or one in-process thread."""
    if spec.runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if spec.dask_address:
        return DaskTaskRunner(address=spec.dask_address)
    local = {"n_workers": spec.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None, "silence_logs": logging.ERROR,
             "local_directory": str(config.home() / "dask"),
             "preload": [PRELOAD]}  # each worker imports torch, prefect and mlflow while it starts, not on its first variant
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local)


@contextlib.contextmanager
def one_prefect_api(spec: SweepSpec) -> Iterator[str | None]:
    """Give every worker process the same Prefect API.

    With no PREFECT_API_URL, Prefect's local mode would start a temporary server in each Dask
    worker; instead one is started here, for the whole run, and its URL handed to the workers
    through the environment they inherit.
    """
    if os.environ.get("PREFECT_API_URL") or spec.runner == "threads":
        yield os.environ.get("PREFECT_API_URL")
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # ship the run's last logs before the API goes away
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


class ClusterLifetime:
    """Start and stop a flow run's Dask cluster in background threads, off the critical path.

    prefect-dask creates the cluster on the first submit, after the teacher phase, and closes
    it when the flow ends, after promotion and the report. Here it starts while the teacher runs
    (worker processes importing torch, prefect and mlflow), and a cluster this run created
    closes while promotion and the report run. With the threads runner both are no-ops.
    """

    def __init__(self) -> None:
        ctx = FlowRunContext.get()
        prefect_dask = sys.modules.get("prefect_dask")  # imported by task_runner() when the spec asks for Dask
        dask = ctx is not None and prefect_dask is not None and isinstance(ctx.task_runner, prefect_dask.DaskTaskRunner)
        self.runner = ctx.task_runner if dask else None
        self.threads: list[threading.Thread] = []

    def _background(self, fn: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=fn, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def start(self) -> None:
        if self.runner is not None:
            self._background(self._start, "dask-cluster-start")

    def ready(self) -> None:
        """Wait for the start; call before the first submit. If starting failed, that submit tries again and raises."""
        for thread in self.threads:
            thread.join()

    def release(self) -> None:
        """Close the cluster once every result is in; only one this run created (none joined by address)."""
        if self.runner is not None and self.runner.client.cluster is not None and not self.runner.address:
            self._background(self._close, "dask-cluster-close")

    def _start(self) -> None:
        try:
            self.runner.client  # noqa: B018 - the property creates the cluster and the client
        except Exception as exc:  # noqa: BLE001 - the first submit raises it again, in the flow
            logging.getLogger(__name__).warning("starting the Dask cluster in the background failed: %r", exc)

    def _close(self) -> None:
        client = self.runner.client
        cluster = client.cluster
        client.close()
        cluster.close()  # the runner's own close on leaving the flow then finds it closed


@contextlib.contextmanager
def cluster_lifetime() -> Iterator[ClusterLifetime]:
    """A :class:`ClusterLifetime` started on entry; its threads are joined on exit, whatever happened."""
    lifetime = ClusterLifetime()
    lifetime.start()
    try:
        yield lifetime
    finally:
        lifetime.ready()


def run(spec: SweepSpec) -> SweepOutcome:
    """Run the compress flow with one Prefect API for every worker (what the CLI and tests call)."""
    with one_prefect_api(spec):
        return compress_flow(spec)


@task(name="start-tracking", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def start_tracking(spec: SweepSpec, flow_run_id: str) -> tuple[str, str]:
    exp = tracking.experiment_id(spec.name)
    return exp, tracking.start_parent(spec, flow_run_id, spec.device)


@task(name="finish-tracking", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def finish_tracking(parent_run_id: str, status: str, metrics: dict[str, float] | None = None) -> None:
    for key, value in (metrics or {}).items():
        tracking.retrying(tracking.client().log_metric, parent_run_id, key, value)
    tracking.finish(parent_run_id, status)


def _summary(spec: SweepSpec, sel: Selection, promo: PromotionOutcome | None) -> str:
    lines = [f"# {spec.name}: {spec.workload} on `{spec.device}`", ""]
    if sel.winner is None:
        lines.append(f"No variant fits the budget. Nearest misses: {', '.join(sel.nearest_misses) or 'none'}.")
    elif promo and promo.promoted:
        lines.append(f"Winner **{sel.winner}**: registered as `{promo.model}` v{promo.version}, alias `champion`, "
                     f"manifest at `{promo.manifest_uri}` ({promo.reason}).")
    elif promo:
        lines.append(f"Winner **{sel.winner}** registered as `{promo.model}` v{promo.version} but not promoted: {promo.reason}.")
    return "\n".join(lines)


def _gathered(recipe, future) -> VariantResult:
    """A variant's record; a failed variant becomes a record saying so, and the sweep goes on."""
    out = future.result(raise_on_failure=False)
    if isinstance(out, BaseException):
        get_run_logger().error("variant %s failed: %r", recipe.name, out)
        return VariantResult(name=recipe.name, recipe=recipe, skipped=f"failed: {type(out).__name__}: {out}")
    return out


@flow(name="compress")
def compress_flow(spec: SweepSpec) -> SweepOutcome:
    """Compress a teacher for an edge device and promote the best variant that fits its budget.

    The deployments' entry point: runs the sweep as a subflow on the task runner the spec asks
    for (a Dask cluster, or one thread).
    """
    return sweep_flow.with_options(task_runner=task_runner(spec))(spec)


@flow(name="sweep", log_prints=True)
def sweep_flow(spec: SweepSpec) -> SweepOutcome:
    """Teacher once, variants fanned out, selection, promotion."""
    log = get_run_logger()
    _, limits = budget.resolve(spec.device, spec.budget)  # bad device: fails before anything is written
    run_id = str(flow_run.get_id() or "local")
    clock = {"start": time.perf_counter()}
    with cluster_lifetime() as cluster:
        exp_id, parent = start_tracking(spec, run_id)
        try:
            clock["tracking_started"] = time.perf_counter()
            info = teacher_task(spec, parent, exp_id)
            clock["teacher"] = time.perf_counter()
            cluster.ready()
            futures = variant_task.map(unmapped(spec), list(info.recipes), unmapped(parent), unmapped(exp_id),
                                       unmapped(info.baseline.report.quality), unmapped(info.outputs_key))
            results = [_gathered(r, f) for r, f in zip(info.recipes, futures)]
            if results and all(r.skipped and r.skipped.startswith("failed:") for r in results):
                raise RuntimeError(f"Every variant failed; first: {results[0].skipped}")
            clock["variants"] = time.perf_counter()
            cluster.release()
            sel = select(results)
            winner = next((r for r in results if r.name == sel.winner), None)
            promo = promote_task(spec, spec.model_name(info.workload_name), winner, limits, run_id) if winner else None
            clock["promotion"] = time.perf_counter()
            report_task(parent, results, info.baseline, sel, limits, _summary(spec, sel, promo))
        except BaseException:
            finish_tracking(parent, "FAILED")
            raise
    finish_tracking(parent, "FINISHED", {"cache_hits": sum(r.cache_hit for r in results),
                                         "variants_fitting": len(sel.fitting),
                                         "tracking_retries": sum(r.tracking_retries for r in (*results, info.baseline)
                                                                 if not r.cache_hit)})
    timings = {
        "teacher_s": clock["teacher"] - clock["tracking_started"],
        "variants_s": clock["variants"] - clock["teacher"],
        "variant_tracking_s": sum(r.tracking_seconds for r in results if not r.cache_hit) + info.baseline.tracking_seconds,
        "promotion_s": clock["promotion"] - clock["variants"],
        "report_and_tracking_s": (clock["tracking_started"] - clock["start"]) + (time.perf_counter() - clock["promotion"]),
        "flow_s": time.perf_counter() - clock["start"],
    }
    log.info(_summary(spec, sel, promo))
    return SweepOutcome(name=spec.name, device=spec.device, budget=limits, teacher=info.baseline, variants=tuple(results),
                        selection=sel, promotion=promo, parent_run_id=parent, flow_run_id=run_id,
                        teacher_forward_samples=info.forward_samples, timings=timings)
