"""The compress flow: teacher once, variants fanned out, selection, promotion."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from flows import runners
from flows import search as search_flow
from flows.search import Watch
from shrinkflow import budget, search, steps
from shrinkflow.errors import ShrinkflowError
from shrinkflow.select import misses_text, select
from shrinkflow.specs import (
    Recipe,
    Selection,
    SweepResult,
    SweepSpec,
    TeacherInfo,
    VariantResult,
)
from tasks import tracking
from tasks.compress import prefix_task, retime_task, teacher_task, variant_task
from tasks.promote import PromotionOutcome, promote_task
from tasks.report import report_task


class SweepOutcome(SweepResult):
    """A sweep's result plus where it went: the promotion, the MLflow parent run, the flow run."""

    promotion: PromotionOutcome | None
    parent_run_id: str
    flow_run_id: str
    timings: dict[str, float]


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
    try:
        server.start(timeout=120)
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # ship the run's last logs before the API goes away
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


@dataclass(frozen=True)
class Progress:
    """Where a running sweep stands, for a live display (the CLI's): its stage and variant counts."""

    stage: Literal["prefect-api", "teacher", "variants", "promotion", "done"]
    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0


#: Called with each Progress of the sweep that :func:`run` runs in this context (None: nobody listens).
_progress_hook: ContextVar[Callable[[Progress], None] | None] = ContextVar("progress_hook", default=None)

#: Seconds between progress reports while variants run.
PROGRESS_EVERY_S = 1.0


def _report(progress: Progress) -> None:
    hook = _progress_hook.get()
    if hook is not None:
        hook(progress)


def run(spec: SweepSpec, on_progress: Callable[[Progress], None] | None = None) -> SweepOutcome:
    """Run the compress flow with one Prefect API for every worker (what the CLI and tests call).

    ``on_progress`` is called, in this thread, as the sweep moves on: each stage, and about once
    a second while variants run, with how many are done, failed and running.
    """
    token = _progress_hook.set(on_progress)
    try:
        _report(Progress(stage="prefect-api"))
        with one_prefect_api(spec):
            outcome = compress_flow(spec)
        _report(Progress(stage="done", total=len(outcome.variants), done=len(outcome.variants),
                         failed=sum(bool(v.skipped and v.skipped.startswith("failed:")) for v in outcome.variants)))
        return outcome
    finally:
        _progress_hook.reset(token)


@task(name="start-tracking", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def start_tracking(spec: SweepSpec, flow_run_id: str) -> tuple[str, str]:
    exp = tracking.experiment_id(spec.name)
    return exp, tracking.start_parent(spec, flow_run_id, spec.device)


@task(name="finish-tracking", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def finish_tracking(parent_run_id: str, status: str, metrics: dict[str, float] | None = None) -> None:
    for key, value in (metrics or {}).items():
        tracking.retrying(tracking.client().log_metric, parent_run_id, key, value)
    tracking.finish(parent_run_id, status)


def _summary(spec: SweepSpec, sel: Selection, promo: PromotionOutcome | None,
             results: list[VariantResult] = ()) -> str:
    """The headline: who won, why (the rule and the runner-up), and where the winner went."""
    lines = [f"# {spec.name}: {spec.workload} on `{spec.device}`", ""]
    if sel.winner is None:
        lines.append(f"No variant fits the budget. Nearest misses: {misses_text(results, sel.nearest_misses)}.")
        return "\n".join(lines)
    lines.append(f"Winner **{sel.winner}** (runner-up: {sel.runner_up or 'none'}). {sel.why}")
    lines += ["", f"Selection rule: {sel.rule}.", ""]
    if promo and promo.promoted:
        lines.append(f"Registered as `{promo.model}` v{promo.version}, alias `champion`, "
                     f"manifest at `{promo.manifest_uri}` ({promo.reason}).")
    elif promo:
        lines.append(f"Registered as `{promo.model}` v{promo.version} but not promoted: {promo.reason}.")
    return "\n".join(lines)


def longest_first(recipes: tuple[Recipe, ...]) -> list[Recipe]:
    """Submission order: the most training first, so a sweep does not end on one long variant
    while the other workers sit idle (Dask starts tasks in submission order)."""
    return sorted(recipes, key=steps.training_work, reverse=True)


def _gathered(recipe, future) -> VariantResult:
    """A variant's record; a failed variant becomes a record saying so, and the sweep goes on."""
    if future.state.name == "NotReady":  # its training prefix failed: it never ran (and never will)
        why = f"failed: its training prefix failed ({future.state.message})"
        get_run_logger().error("variant %s %s", recipe.name, why)
        return VariantResult(name=recipe.name, recipe=recipe, skipped=why)
    out = future.result(raise_on_failure=False)
    if isinstance(out, BaseException):
        get_run_logger().error("variant %s failed: %r", recipe.name, out)
        return VariantResult(name=recipe.name, recipe=recipe, skipped=f"failed: {type(out).__name__}: {out}")
    return out


def _settled(state) -> bool:
    """Final, or never to run: a task whose upstream failed stays PENDING as "NotReady"."""
    return state.is_final() or state.name == "NotReady"


def _wait_all(futures: list[PrefectFuture], before: int = 0, total: int | None = None) -> None:
    """Wait for every variant; with a listener, report progress about once a second (``before``
    variants already done out of ``total``, for a search that runs its trials batch by batch)."""
    if _progress_hook.get() is None:
        for future in futures:
            future.wait()  # returns for a "NotReady" task too: its run ended without running it
        return
    pending, failed = list(futures), 0
    total = len(futures) if total is None else total
    while pending:
        pending[0].wait(timeout=PROGRESS_EVERY_S)
        for future in pending[1:]:
            future.wait(timeout=0)  # a finished future keeps its final state; the others ask the API
        states = [future.state for future in pending]
        failed += sum(_settled(s) and not s.is_completed() for s in states)
        pending = [future for future, s in zip(pending, states, strict=True) if not _settled(s)]
        _report(Progress(stage="variants", total=total, done=before + len(futures) - len(pending), failed=failed,
                         running=sum(s.is_running() for s in states)))


def _fan_out(spec: SweepSpec, info: TeacherInfo, variants: runners.Variants, parent: str, exp_id: str,
             recipes: tuple[Recipe, ...] | None = None,
             watch: Watch | None = None) -> tuple[list[steps.PrefixNode], list[PrefectFuture], dict[str, PrefectFuture]]:
    """Submit the sweep (or one search batch: ``recipes``) as a tree: each distinct training prefix
    once, as a task named by its step kind (distill, prune, finetune, vocab) after its parent
    prefix; each recipe's leaf (its quantize steps, packing, measuring and tracking) after its own
    prefix. Only keys travel."""
    recipes = info.recipes if recipes is None else recipes
    runnable = [r for r in longest_first(recipes) if r.name not in info.skipped]
    nodes, leaf_of = steps.plan(runnable)
    chain: dict[str, list[int]] = {}
    for name, node in leaf_of.items():
        chain[name] = []
        while node is not None:
            chain[name].append(node)
            node = nodes[node].parent
    prefixes: list[PrefectFuture] = []
    for i, node in enumerate(nodes):
        task_ = prefix_task.with_options(name=node.kind, task_run_name=node.label[-120:])
        params = {"spec": spec, "prefix": node.steps, "outputs_key": info.outputs_key,
                  "after": prefixes[node.parent] if node.parent is not None else None}  # its parent's result
        if watch is not None:
            trials = tuple(sorted(watch.trial_of[n] for n, c in chain.items() if i in c and n in watch.trial_of))
            params |= {"study": watch.study, "pruner": watch.pruner, "trials": trials}
        prefixes.append(variants.submit(task_, params))
    common = {"spec": spec, "parent_run_id": parent, "experiment_id": exp_id,
              "baseline_quality": info.baseline.report.quality, "outputs_key": info.outputs_key}

    def leaf(recipe: Recipe):
        kind = "quantize" if any(s.kind == "quantize" for s in recipe.steps) else "measure"
        return variant_task.with_options(name=kind, task_run_name=recipe.name)

    def parameters(recipe: Recipe) -> dict:
        node = leaf_of.get(recipe.name)
        return {**common, "recipe": recipe, "after": prefixes[node] if node is not None else None,
                **({"trial": watch.trial_of.get(recipe.name)} if watch else {})}

    futures = variants.map(leaf, longest_first(recipes), name=lambda r: r.name, parameters=parameters)
    return nodes, prefixes, futures


@dataclass
class Pending:
    """A submitted batch of variants, not yet gathered (see :func:`submit_batch`)."""

    recipes: tuple[Recipe, ...]
    prefixes: list[PrefectFuture]
    futures: dict[str, PrefectFuture]
    nodes: list[steps.PrefixNode] = field(default_factory=list)  # the prefix tasks' steps, as ``prefixes``

    def collect(self, progress: tuple[int, int] | None = None) -> tuple[list[VariantResult], dict]:
        """Wait for the batch; its records in recipe order (a recipe whose prefix a search's pruner
        stopped has a record saying "pruned: ..."), and its prefix counts. ``progress``: variants
        done before this batch is collected (batches in flight beside it are collected after it),
        and the total expected, for a search's progress reports."""
        before, total = progress or (0, len(self.futures))
        _report(Progress(stage="variants", total=total, done=before))
        _wait_all(list(self.futures.values()), before, total)
        return [_gathered(r, self.futures[r.name]) for r in self.recipes], _prefix_counts(self.prefixes)

    def done(self) -> bool:
        """Whether every variant of the batch has ended (its collection would not wait)."""
        for future in self.futures.values():
            future.wait(timeout=0)
            if not _settled(future.state):
                return False
        return True

    def running(self) -> int:
        """Variants of the batch running now."""
        return sum(future.state.is_running() for future in self.futures.values())

    @staticmethod
    def first_ended(batches: list[Pending], progress: tuple[int, int] | None = None) -> int:
        """The index of the first of ``batches`` to end, polled every half second; meanwhile, with
        a listener, progress is reported (``progress``: variants done before these batches, and the
        total expected) with the variants running in all of them."""
        while True:
            for i, batch in enumerate(batches):
                if batch.done():
                    return i
            if progress is not None and _progress_hook.get() is not None:
                _report(Progress(stage="variants", total=progress[1], done=progress[0],
                                 running=sum(batch.running() for batch in batches)))
            time.sleep(0.5)

    def computed_prefixes(self) -> list[tuple[tuple, float]]:
        """The training prefixes this batch computed (not read from the cache): their steps, and
        the seconds each task took. Call after :meth:`collect`."""
        done = [f.result(raise_on_failure=False) for f in self.prefixes]
        return [(node.steps, d["seconds"]) for node, d in zip(self.nodes, done, strict=True)
                if isinstance(d, dict) and d["computed"]]


def submit_batch(spec: SweepSpec, info: TeacherInfo, variants: runners.Variants, parent: str, exp_id: str,
                 recipes: tuple[Recipe, ...] | None = None, watch: Watch | None = None) -> Pending:
    """Submit ``recipes`` (default: the sweep's) and return at once: a search submits its next
    batch while this one runs."""
    recipes = info.recipes if recipes is None else recipes
    nodes, prefixes, futures = _fan_out(spec, info, variants, parent, exp_id, recipes, watch)
    return Pending(recipes, prefixes, futures, nodes)


def _prefix_counts(prefixes: list[PrefectFuture]) -> dict[str, int]:
    """How many training prefixes this sweep computed, and how many it found stored already."""
    done = [f.result(raise_on_failure=False) for f in prefixes]
    done = [d for d in done if isinstance(d, dict)]
    return {"prefixes_computed": sum(d["computed"] for d in done),
            "prefixes_reused": sum(not d["computed"] and not d.get("pruned") for d in done),
            "prefixes_pruned": sum(bool(d.get("pruned")) for d in done), "prefixes_failed": len(prefixes) - len(done)}


def retimed(spec: SweepSpec, teacher: VariantResult, results: list[VariantResult],
            variants: runners.Variants) -> tuple[VariantResult, list[VariantResult]]:
    """The finalists timed again (:func:`tasks.compress.retime_task`), as one more task on the
    variant runner: a worker that has usually loaded their runtimes already (in the flow's own
    process an ExecuTorch finalist cost about 7 s of imports and lowering before its first call),
    on the kind of host that measured them, the other workers idle. With nothing measured there
    is nothing to time, and a worker that fails it (lost, say) leaves it to this process."""
    parameters = {"spec": spec, "teacher": teacher, "results": results}
    if not any(r.run_id and r.report is not None for r in results):
        return retime_task(**parameters)
    try:
        return variants.submit(retime_task, parameters).result()
    except Exception as exc:  # noqa: BLE001 - a lost worker raises Dask's errors; the figures are still wanted
        get_run_logger().warning("re-timing the finalists on the runner failed (%s: %s); timing them in the flow's "
                                 "process instead", type(exc).__name__, str(exc)[:200])
        return retime_task(**parameters)


@flow(name="compress", log_prints=True)
def compress_flow(spec: SweepSpec) -> SweepOutcome:
    """Compress a teacher for an edge device and promote the best variant that fits its budget.

    Teacher once, variants fanned out on the runner the spec asks for (a Dask cluster, or one
    thread), selection, promotion: one flow run. The CLI's and the deployments' entry point.
    """
    log = get_run_logger()
    profile, limits = budget.resolve(spec.device, spec.budget)  # bad device: fails before anything is written
    search.check(spec, profile)
    run_id = str(flow_run.get_id() or "local")
    clock = {"start": time.perf_counter()}
    with runners.started(spec) as variants:
        exp_id, parent = start_tracking(spec, run_id)
        try:
            clock["tracking_started"] = time.perf_counter()
            _report(Progress(stage="teacher"))
            info = teacher_task(spec, parent, exp_id)
            clock["teacher"] = time.perf_counter()
            searched = search_flow.run_search(spec, info, variants, parent, exp_id, submit_batch) if spec.searching else None
            results, counts = ((searched.results, searched.counts) if searched
                               else submit_batch(spec, info, variants, parent, exp_id).collect())
            if results and all(r.skipped and r.skipped.startswith("failed:") for r in results):
                raise ShrinkflowError(f"Every variant failed ({len(results)}); the first, {results[0].name!r}: "
                                      f"{results[0].skipped[len('failed:'):].strip()}. Each failure is in its MLflow run; "
                                      "`shrinkflow run -v` shows the tracebacks.")
            clock["variants"] = time.perf_counter()
            _report(Progress(stage="promotion", total=len(results), done=len(results)))
            teacher, results = retimed(spec, info.baseline, results, variants)
            variants.release()
            info = info.model_copy(update={"baseline": teacher})
            clock["retimed"] = time.perf_counter()
            sel = select(results, spec.objective, spec.quality_tolerance)
            winner = next((r for r in results if r.name == sel.winner), None)
            promo = promote_task(spec, spec.model_name(info.workload_name), winner, limits, run_id) if winner else None
            clock["promotion"] = time.perf_counter()
            report_task(parent, results, info.baseline, sel, limits, _summary(spec, sel, promo, results))
            if searched is not None:
                search_flow.publish(parent, searched, results, sel)
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
        "retime_s": clock["retimed"] - clock["variants"],
        "promotion_s": clock["promotion"] - clock["retimed"],
        "report_and_tracking_s": (clock["tracking_started"] - clock["start"]) + (time.perf_counter() - clock["promotion"]),
        "flow_s": time.perf_counter() - clock["start"],
        **counts,
        **({f"search_{k}": v for k, v in searched.stats.items()} if searched else {}),
    }
    log.info(_summary(spec, sel, promo, results))
    return SweepOutcome(name=spec.name, device=spec.device, budget=limits, teacher=info.baseline, variants=tuple(results),
                        selection=sel, promotion=promo, parent_run_id=parent, flow_run_id=run_id,
                        teacher_forward_samples=info.forward_samples, timings=timings)
