"""Variant tasks: build, measure and track one recipe (or the teacher baseline).

Tasks exchange small records (VariantResult, run ids, URIs). Models and tensors stay in the
worker: the teacher's weights and outputs are read by content key from the artifact store,
and each variant's model is written to MLflow (and, when promoted, to the store).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import hashlib
import json
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shrinkflow import artifact, budget, pipeline, steps, workloads
from shrinkflow.errors import TrialStopped
from shrinkflow.export import export_program
from shrinkflow.measure import (
    host_cores,
    latency,
    memory_profiler,
    quiet_reference_ms,
    reference_for,
    reference_kind,
    rescaled,
    retime,
    threads,
    with_latency,
)
from shrinkflow.select import select
from shrinkflow.specs import Recipe, Step, SweepSpec, TeacherInfo, VariantResult
from tasks import config, storage, tracking


def ready_profiler() -> None:
    """Start torch's profiler once, in the thread that imported torch.

    torch registers its profiler client (Kineto) in the thread that imports it, and Kineto starts
    on the first profile, in whichever thread that is; in another thread it prints "ERROR: External
    init callback must run in same thread as registerClient". measure() profiles every variant's
    forward pass, and a Dask worker runs tasks in threads of its own, so each worker readies
    the profiler here, from its main thread, before it takes any task.
    """
    with memory_profiler():
        pass


def dask_setup(worker: object) -> None:
    """Dask preload hook (``--preload tasks.compress``): runs in the worker's main thread at start."""
    ready_profiler()


def dask_teardown(worker: object) -> None:
    """Dask preload hook: runs as the worker closes, before its process exits.

    Exiting, the interpreter runs a full collection over every object it tracks; with torch,
    Prefect and MLflow loaded and variants trained, a worker took 1.6 s to exit after its work,
    0.3 s with those objects frozen (``gc.freeze()``: collections skip them; docs/BENCHMARKS.md,
    "exit"). Nothing is collected after this, and the process is ending."""
    gc.freeze()


def store_cache() -> storage.StoreCache:
    return storage.StoreCache(storage.open_store(config.store_uri()))


@functools.lru_cache(maxsize=4)
def context(ref: str, seed: int, task: str | None = None, data: str | None = None,
            max_length: int | None = None) -> pipeline.Context:
    """The workload and the teacher outputs, loaded once per worker process from the store
    (arguments: :meth:`SweepSpec.workload_args`)."""
    cache = store_cache()
    return pipeline.context(workloads.load(ref, seed, cache, task=task, data=data, max_length=max_length), cache, seed)


#: Training runs single-threaded so a variant's weights, quality and size are bit-identical
#: whichever runner (and however many workers) built it; parallelism comes from workers.
TRAIN_THREADS = 1


#: Measuring takes at most 1 / HEADROOM of the host's cores, so that other load on up to the rest
#: (the flow's own Prefect server and tracking, another job) finds idle cores and never shares one
#: with a timed thread: with two timed threads on two cores and a busy loop on one of them, every
#: parallel region waits for the preempted thread, by an amount the reference kernel does not share
#: (docs/BENCHMARKS.md, "load_digits_threads"). One thread on a free core is not slowed.
HEADROOM = 2


def worker_threads(spec: SweepSpec) -> int:
    """Threads for measuring one variant: this worker's share of the host's cores, so that
    workers x threads never exceeds the cores (a local cluster's N workers share this host; on a
    cluster joined by address, the task slots of every worker on this worker's host do), and never
    more than 1 / HEADROOM of them, whichever runner (the threads runner measures as one of two
    workers would)."""
    if spec.runner == "dask" and not spec.dask_address:
        share = spec.workers
    elif spec.runner == "dask":
        share = _task_slots_on_this_host()
    else:
        share = 1
    return max(1, host_cores() // max(share, HEADROOM))


def _task_slots_on_this_host() -> int:
    """Threads of all Dask workers on this worker's host (1 outside a worker), from the scheduler."""
    from distributed import get_worker
    from distributed.comm import get_address_host

    try:
        worker = get_worker()
    except ValueError:  # not in a Dask worker: the flow process, measuring the teacher
        return 1
    host = get_address_host(worker.address)
    workers = worker.client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(w.get("nthreads", 1) for addr, w in workers.items() if get_address_host(addr) == host))


def variant_key(spec: SweepSpec, recipe: Recipe, outputs_key: str, n_threads: int) -> str:
    """What determines a variant's measurements: recipe, teacher and data (outputs key), seed, threads."""
    profile, limits = budget.resolve(spec.device, spec.budget)
    what = {"recipe": recipe.model_dump(mode="json"), "teacher_outputs": outputs_key, "workload": spec.workload,
            "seed": spec.seed, "threads": min(limits.threads, n_threads), "power_w": profile.active_power_w,
            "version": 1}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _track(ctx: pipeline.Context, run_id: str, result: VariantResult, packed: artifact.Packed | None,
           retries_before: int) -> VariantResult:
    t0 = time.perf_counter()
    if packed is not None:
        model_uri = tracking.log_model(run_id, packed.shipped(), ctx.workload.example_inputs, packed.filename,
                                       packed.data, assets=packed.assets, dynamic_dims=ctx.workload.dynamic_dims,
                                       input_names=ctx.workload.input_names)
        result = result.model_copy(update={"model_uri": model_uri, "artifact_uri": f"runs:/{run_id}/deploy/{packed.filename}"})
    result = result.model_copy(update={"run_id": run_id, "tracking_seconds": time.perf_counter() - t0,
                                       "tracking_retries": tracking.retry_count() - retries_before})
    tracking.log_variant(run_id, result)
    tracking.finish(run_id)
    return result


@task(name="teacher", cache_policy=NO_CACHE)
def teacher_task(spec: SweepSpec, parent_run_id: str, experiment_id: str) -> TeacherInfo:
    """Resolve the workload, compute the teacher outputs once (cached), and log the baseline run."""
    log = get_run_logger()
    context.cache_clear()  # a fresh sweep sees fresh data; variants in this process reuse it
    ctx = context(**spec.workload_args())
    profile, limits = budget.resolve(spec.device, spec.budget)
    recipes = pipeline.recipes_for(spec, ctx.workload, limits)
    if steps.needs_teacher_outputs(recipes):  # once, here, before any worker needs them
        log.info("teacher outputs %s: %d forward samples (0 = cache hit)", ctx.teacher_key[:12], ctx.teacher_out.forward_samples)
    else:
        log.info("teacher outputs %s: not needed (no step trains against the teacher)", ctx.teacher_key[:12])
    retries = tracking.retry_count()
    run_id = tracking.start_child(parent_run_id, experiment_id, "teacher", role="baseline")
    with threads(TRAIN_THREADS):
        result, packed = pipeline.evaluate(ctx, "teacher", ctx.workload.teacher, None, profile, limits, None,
                                           max_threads=worker_threads(spec))
    # The teacher is measured as it would ship, but its program is not logged: the user has the
    # teacher, and for a MiniLM-sized one it would be two copies of about 90 MB on every sweep.
    result = _track(ctx, run_id, result, None, retries)
    tracking.retrying(tracking.client().log_metric, parent_run_id, "teacher_forward_samples", ctx.forward_samples)
    skipped = {r.name: why for r in recipes if (why := pipeline.precheck(ctx, r, limits, profile))}
    return TeacherInfo(baseline=result, workload_name=ctx.workload.name, outputs_key=ctx.teacher_key,
                       forward_samples=ctx.forward_samples, recipes=recipes, skipped=skipped)


@task(name="prefix", cache_policy=NO_CACHE)
def prefix_task(spec: SweepSpec, prefix: tuple[Step, ...], outputs_key: str, after: dict | None = None,
                study: str | None = None, pruner: dict | None = None, trials: tuple[int, ...] = ()) -> dict:
    """One training prefix of the sweep's tree (its parent is already stored): load it if any
    earlier sweep stored it, else compute its last step and store it. Returns its key and
    whether it was computed here; the model stays in the store. In a search, each validation score
    goes to the Optuna ``trials`` that depend on this prefix, and their pruner may stop it: the
    result then says ``"pruned"`` (why), nothing is stored, and the prefixes and leaves that come
    ``after`` it stop at once."""
    if after is not None and after.get("pruned"):
        return {"key": None, "computed": False, "pruned": after["pruned"], "seconds": 0.0}
    ctx = context(**spec.workload_args())
    before, t0 = dict(ctx.stats), time.perf_counter()
    if study is not None:
        from tasks.search import PrunerSpec, monitoring

        watched = monitoring(study, PrunerSpec.model_validate(pruner), list(trials))
    else:
        watched = contextlib.nullcontext()
    try:
        with threads(TRAIN_THREADS), watched:
            _, keys = steps.materialize(ctx, prefix)
    except TrialStopped as exc:
        get_run_logger().info("prefix %s", exc)
        return {"key": None, "computed": False, "pruned": str(exc), "seconds": time.perf_counter() - t0}
    computed = ctx.stats["computed"] > before["computed"]
    get_run_logger().info("prefix %s: %s in %.1f s", keys[-1][:12], "computed" if computed else "reused",
                          time.perf_counter() - t0)
    return {"key": keys[-1], "computed": computed, "seconds": time.perf_counter() - t0}


@task(name="variant", task_run_name="variant-{recipe.name}", cache_policy=NO_CACHE)
def variant_task(spec: SweepSpec, recipe: Recipe, parent_run_id: str, experiment_id: str,
                 baseline_quality: float, outputs_key: str, trial: int | None = None,
                 after: dict | None = None) -> VariantResult:
    """One recipe: reuse an earlier identical result, or build it, measure the shipped artifact
    and log one child run. Not retried blindly: a rerun after a crash finds its own run."""
    log = get_run_logger()
    if after is not None and after.get("pruned"):  # its training prefix was stopped by the search
        return VariantResult(name=recipe.name, recipe=recipe, skipped=after["pruned"])
    n_threads = worker_threads(spec)
    retries = tracking.retry_count()
    key = variant_key(spec, recipe, outputs_key, n_threads)
    profile, limits = budget.resolve(spec.device, spec.budget)
    done = tracking.finished_variant(experiment_id, key)
    if done is not None:
        log.info("%s: cache hit, reusing run %s", recipe.name, done.run_id)
        return pipeline.rejudge(done, limits, baseline_quality).model_copy(update={"cache_hit": True})
    ctx = context(**spec.workload_args())
    run_id = tracking.start_child(parent_run_id, experiment_id, recipe.name, variant_key=key,
                                  role="variant" if trial is None else "trial")
    try:
        with threads(TRAIN_THREADS):  # measure() sets its own count, at most n_threads: workers x threads <= cores
            result, packed = pipeline.run_variant(ctx, recipe, profile, limits, baseline_quality, max_threads=n_threads,
                                                  validation=trial is not None)
        result = _track(ctx, run_id, result, packed, retries)
    except BaseException:
        tracking.finish(run_id, "FAILED")
        raise
    log.info("%s: %s", recipe.name, "skipped: " + result.skipped if result.skipped else
             f"quality {result.report.quality:.4f}, {result.report.size_bytes} B, fits={result.fits}")
    return result


#: At most this many final candidates are re-timed together (the fitting set first).
RETIME_MAX = 12
#: A latency (or energy) limit can decide a candidate whose figure is within this factor of it:
#: load was seen to inflate timings 2.5-4.5x, and the normalised figures are far closer than that.
RETIME_BAND = 3.0


def latency_decides(result: VariantResult, limits, objective: str) -> bool:
    """Whether a re-timing could change ``result``'s verdict or rank: the objective ranks by
    speed or energy, or its p50 (or energy) is within RETIME_BAND of its limit."""
    if objective in ("fastest", "lowest-energy"):
        return True
    report = result.report
    pairs = [(report.latency_p50_ms, limits.max_latency_ms)]
    if report.energy_source == "estimated":  # power x p50: it moves with the latency
        pairs.append((report.energy_mj, limits.max_energy_mj))
    return any(limit is not None and limit / RETIME_BAND <= value <= limit * RETIME_BAND for value, limit in pairs)


@task(name="retime", cache_policy=NO_CACHE)
def retime_task(spec: SweepSpec, teacher: VariantResult, results: list[VariantResult]) -> tuple[VariantResult, list[VariantResult]]:
    """The sweep's latency figures made comparable before selection: the teacher, the likely winner
    and runner-up, and the finalists (the fitting set and the nearest misses) whose verdict or
    rank latency can decide (:func:`latency_decides`) timed again together in this one process,
    interleaved round by round; then every figure scaled to the quietest host calibration the
    sweep saw. A variant timed
    while the host was busy cannot lose (or win) a latency limit on that moment alone.

    The flow runs it on its variant runner once every variant is in (:func:`flows.compress.retimed`):
    a worker that has usually loaded the finalists' runtimes, on the kind of host that measured
    them, the other workers idle. Their runs are tagged with this process (``retimed_host_pid``)."""
    log = get_run_logger()
    _, limits = budget.resolve(spec.device, spec.budget)
    baseline = teacher.report.quality if teacher.report else None
    sel = select(results, spec.objective, spec.quality_tolerance)
    names = [*sel.fitting, *(n for n in sel.nearest_misses if n not in sel.fitting)][:RETIME_MAX]
    # The likely winner and runner-up always, for the speed-up the report states against the
    # teacher (timed with them); other finalists where latency can decide their verdict or rank.
    chosen = [r for r in results if r.run_id and r.report is not None and (r.name in (sel.winner, sel.runner_up) or (
        r.name in names and latency_decides(r, limits, spec.objective)))]
    # At the thread count the variants were measured with (a worker's share of the cores), so
    # that re-timed and other figures stay comparable; the teacher is re-timed at it too.
    counts = collections.Counter(r.report.threads for r in chosen)
    retimed = _retimed(spec, [teacher, *chosen], counts.most_common(1)[0][0]) if chosen else {}
    out = []
    for r in (teacher, *results):
        new = retimed.get(r.name, r)
        if new.report is not None:
            quiet = quiet_reference_ms(new.report.threads, kind=reference_kind(new.report.artifact_format))
            new = new.model_copy(update={"report": rescaled(new.report, quiet)})
        if new.report is not None and new.report != r.report:
            new = pipeline.rejudge(new, limits, baseline) if r is not teacher else new
            log.info("%s: p50 %.3f -> %.3f ms%s (fits=%s)", r.name, r.report.latency_p50_ms, new.report.latency_p50_ms,
                     ", re-timed with the other finalists" if r.name in retimed else ", scaled to the host calibration",
                     new.fits)
            if new.run_id:
                tracking.log_variant(new.run_id, new, retimed=r.name in retimed)
        out.append(new)
    return out[0], out[1:]


def _retimed(spec: SweepSpec, chosen: list[VariantResult], n_threads: int) -> dict[str, VariantResult]:
    """``chosen`` timed again together from their logged programs, in this process."""
    wl = context(**spec.workload_args()).workload
    formats = {name: fmt for fmt, name in artifact.FILENAMES.items()}
    programs = {}
    for r in chosen:
        if r.run_id is None or r.recipe is None:  # the teacher: its program is not logged; export it here
            programs[r.name] = (export_program(wl.teacher, wl.example_inputs, dynamic_dims=wl.dynamic_dims).module(),
                                wl.example_inputs)
            continue
        fname, data, _ = tracking.deployable(r.run_id)
        programs[r.name] = (artifact.loads(data, formats[fname]), wl.example_inputs)
    n_threads = min(n_threads, host_cores())
    with threads(n_threads):
        timings = retime(programs)
    out = {}
    for r in chosen:
        kind = reference_for(programs[r.name][0]).kind
        lat = latency(timings[r.name], quiet_reference_ms(n_threads, timings[r.name], kind))
        out[r.name] = r.model_copy(update={"report": with_latency(r.report, lat, n_threads)})
    return out
