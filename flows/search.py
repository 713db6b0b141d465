"""The search half of the compress flow: trials asked in batches, run as the sweep's own step tasks on
the workers (prefixes shared and cached as in any sweep), told back to the study, each recorded as
an MLflow child run. The engine and its storage are in tasks/search.py; what is searched is
derived in shrinkflow/search.py."""

from __future__ import annotations

import collections
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy
from prefect import get_run_logger

from shrinkflow import steps
from shrinkflow.specs import Selection, SweepSpec, TeacherInfo, VariantResult
from tasks import search as engine


@dataclass(frozen=True)
class Watch:
    """A search batch's link to its study: each prefix task reports to the trials built on it."""

    study: str
    pruner: dict
    trial_of: dict[str, int]  # recipe name -> trial number


@dataclass
class Searched:
    """What a search produced: the records to select from, the prefix counts, and every trial."""

    results: list[VariantResult]
    counts: dict[str, int]
    trials: list[engine.Trial] = field(default_factory=list)
    study: str = ""
    stats: dict[str, float] = field(default_factory=dict)
    space: str = ""


def _ended(trial: engine.Trial, result: VariantResult) -> engine.Trial:
    """A batch trial with its record, in the state the study is told."""
    skipped = result.skipped or ""
    if skipped.startswith("pruned:"):
        state = "PRUNED"
    elif skipped.startswith("failed:"):
        state = "FAIL"
    elif result.report is not None:
        state = "COMPLETE"
    else:
        state = "PRUNED"  # refused in the worker before training (its precheck)
    return trial.model_copy(update={"state": state, "note": skipped or trial.note, "result": result})


#: A trial's own part for a runtime no trial has timed yet, as a multiple of the fixed part (a torch
#: program's): an ExecuTorch program is lowered, serialized and measured in its own runtime. On
#: digits ``rpi4`` the first ExecuTorch trial on a worker took 10.3 s where a torch one took 3.6 s;
#: later ones about 3x a torch one.
UNTIMED_RUNTIME_COST = {"executorch": 3.0}


@dataclass
class Clock:
    """How long a batch of trials is expected to take, from submission to collection, so that no
    batch starts under a time budget that would end past it.

    A trial costs its own part (quantize, pack, measure, log: timed on the first batch, the
    teacher's untrained trials, and then per quantization from every trial's record) plus its
    training (prefixes already computed are free). Training starts as teacher-sized sample passes
    (:func:`steps.training_samples`) at the teacher's training seconds per sample, timed once
    before the search. Once training prefixes have been computed, it is fitted to their measured
    times: a fixed part per prefix task, one per sample drawn (a training loop's own cost, which
    dominates a small student's time) and one per width-weighted sample (:func:`steps.training_load`).
    Batch estimates are then scaled by the median ratio of measured to estimated over the training
    batches so far, re-weighed with the current fit (what a batch waits behind the one in flight,
    and the flow's own dispatch)."""

    per_sample: float
    workers: int
    n_train: int
    overhead: float = 0.0
    done: set[str] = field(default_factory=set)
    #: Training fitted to the computed prefixes: (seconds per prefix task, per sample drawn, per
    #: width-weighted sample), or two such fits where the prefixes timed cannot tell draws from
    #: width (a trial is then estimated by the larger). Empty: ``per_sample`` per weighted sample.
    fits: list[tuple[float, float, float]] = field(default_factory=list)
    #: A trial's own part (seconds) by what it does after its training prefix: its quantization; and
    #: by its runtime, for a quantization not timed yet (an ExecuTorch program is built and measured
    #: in several times a torch one's seconds; before any is timed, :data:`UNTIMED_RUNTIME_COST`).
    own: dict[str, list[float]] = field(default_factory=dict)
    timed: list[tuple[int, float, float, float]] = field(default_factory=list)  # computed prefixes
    trained_batches: list[tuple[list, frozenset[str], float]] = field(default_factory=list)

    def trains(self, recipes) -> bool:
        return any(steps.training_samples(r, self.n_train, frozenset(self.done)) > 0 for r in recipes)

    def trial(self, recipe, done: frozenset[str] | None = None) -> float:
        """One trial's estimate: its own part and its training not yet computed."""
        runs, draws, weighted = steps.training_load(recipe.steps, self.n_train,
                                                    frozenset(self.done) if done is None else done)
        timed = self.own.get(_leaf(recipe)) or self.own.get(recipe.runtime)
        own = (max(self.overhead, statistics.median(timed)) if timed
               else self.overhead * UNTIMED_RUNTIME_COST.get(recipe.runtime, 1.0))
        fits = self.fits or [(0.0, 0.0, self.per_sample)]
        return own + max(task * runs + draw * draws + sample * weighted for task, draw, sample in fits)

    def raw(self, recipes, done: frozenset[str] | None = None) -> float:
        """The estimate before scaling: the longest trial, or the work shared by the workers."""
        times = [self.trial(r, done) for r in recipes]
        return max(max(times, default=0.0), sum(times) / self.workers)

    @property
    def factor(self) -> float:
        """How far training batches' estimates were off so far (measured / estimated, the median)."""
        ratios = [seconds / raw for recipes, done, seconds in self.trained_batches
                  if (raw := self.raw(recipes, done)) > 0]
        return statistics.median(ratios) if ratios else 1.0

    def batch(self, recipes) -> float:
        return self.raw(recipes) * self.factor

    def learn(self, recipes, trained: bool, seconds: float, results: list[VariantResult] = (),
              prefixes: list[tuple[tuple, float]] = ()) -> None:
        """Learn from a batch that took ``seconds`` from submission to collection.

        An untrained batch times the fixed part of a trial. A training batch's ``results`` time each
        trial's own part besides training (building from the cached prefix, quantizing, measuring,
        logging): when the median of the cheapest runtime's is more than the fixed part known so
        far (a search whose first trial trained: nothing timed it before), it becomes the fixed
        part. Every record also times its quantization's own part, and its runtime's. ``prefixes``: the training prefixes this batch computed (their
        steps, and the seconds their task took); once enough are timed, training is fitted to them."""
        if not trained:
            self.overhead = max(self.overhead, seconds / max(1.0, len(recipes) / self.workers))
        by_runtime: dict[str, list[float]] = {}
        for r in results:
            if r.report is None:
                continue
            by_runtime.setdefault(r.recipe.runtime if r.recipe else "", []).append(r.seconds + r.tracking_seconds)
            if r.recipe is not None:
                for key in (_leaf(r.recipe), r.recipe.runtime):  # the runtime's: for a quantization not timed yet
                    self.own.setdefault(key, []).append(r.seconds + r.tracking_seconds)
        # the fixed part is what the cheapest runtime's trials took (an ExecuTorch program costs more)
        fixed = min((statistics.median(v) for v in by_runtime.values()), default=0.0)
        if trained and fixed > self.overhead:
            self.overhead = fixed
        self._fit(prefixes)
        if trained:
            self.trained_batches.append((list(recipes), frozenset(self.done), seconds))
        for r in recipes:
            prefix = steps.training_prefix(r)
            self.done.update(steps.prefix_identity(prefix[:i]) for i in range(1, len(prefix) + 1))

    def _fit(self, prefixes: list[tuple[tuple, float]]) -> None:
        """Fit training to the computed prefixes' times (non-negative least squares): seconds per
        prefix task, per sample drawn, per width-weighted sample. Until the prefixes timed tell the
        three apart, two fits (a task and draws; a task and width-weighted samples)."""
        for specs, seconds in prefixes:
            done = frozenset(steps.prefix_identity(specs[:i]) for i in range(1, len(specs)))
            self.timed.append((*steps.training_load(specs, self.n_train, done), seconds))
        if len(self.timed) < 2:
            return
        from scipy.optimize import nnls

        rows = numpy.array([t[:3] for t in self.timed], dtype=float)
        rows /= (scale := numpy.maximum(rows.max(axis=0), 1e-12))  # columns of very different magnitudes
        seconds = numpy.array([t[3] for t in self.timed], dtype=float)
        if numpy.linalg.matrix_rank(rows) == 3:
            self.fits = [tuple((nnls(rows, seconds)[0] / scale).tolist())]
            return
        self.fits = []
        for drop in (2, 1):  # draws alone, then width-weighted samples alone
            keep = [c for c in range(3) if c != drop]
            coef = numpy.zeros(3)
            coef[keep] = nnls(rows[:, keep], seconds)[0] / scale[keep]
            self.fits.append(tuple(coef.tolist()))


def _leaf(recipe) -> str:
    """What a trial does after its training prefix (its quantization steps), as a key."""
    return json.dumps([s.model_dump(mode="json") for s in recipe.steps if not steps.STEPS[s.kind].cached],
                      sort_keys=True)


def over_budget(budget_s: float, spent_s: float, batch_seconds: list[float], tried: bool = True) -> str | None:
    """Why no further batch may start under a time budget, or None: the budget is spent, or a
    batch submitted now would end past it (``batch_seconds``: estimates of its time from submission
    to collection, their median; :func:`run_search` passes :class:`Clock`'s, and counts the time
    still needed by the batches in flight as spent).
    A search that has ``tried`` nothing yet is never stopped: it runs one trial even past the
    budget (see :func:`run_search`), so that it ends with a measured variant, not with nothing."""
    if not tried:
        return None
    if spent_s >= budget_s:
        return f"the {budget_s / 60:g}-minute budget is spent"
    if batch_seconds and spent_s + statistics.median(batch_seconds) > budget_s:
        return (f"a batch takes about {statistics.median(batch_seconds):.0f} s and {budget_s - spent_s:.0f} s are left "
                f"of the {budget_s / 60:g}-minute budget")
    return None


def first_parts(batch: list[engine.Trial], clock: Clock) -> list[list[engine.Trial]]:
    """The first batch under a time budget, as the batches it is submitted and collected as: its
    untrained trials (the teacher under post-training quantization: seconds each), then the trials
    that train. Collected on their own, the untrained ones time a trial's fixed part while the
    training still runs, and the next batch is asked then, weighed against what is left: the worker
    that ran them takes its trials instead of waiting for the batch's longest one. The trials and
    their order are the same as in one batch, so the search stays deterministic."""
    cold = [t for t in batch if not clock.trains([t.recipe])]
    warm = [t for t in batch if clock.trains([t.recipe])]
    return [part for part in (cold, warm) if part]


def _within_budget(budget_s: float, start: float, batch: list[engine.Trial], flight, clock: Clock,
                   tried: bool = True) -> tuple[list[engine.Trial], list[engine.Trial]]:
    """The longest head of ``batch`` that, started after the batches in flight, is estimated to end
    within the budget; the rest as failed trials that were not run (the sampler ignores those).
    A search that has not ``tried`` anything yet keeps the head's first trial whatever its estimate."""
    now = time.perf_counter()
    ahead = sum(max(0.0, raw * clock.factor - (now - submitted)) for _, _, submitted, raw, _ in flight)
    spent = now - start + ahead
    keep = len(batch)
    while keep and over_budget(budget_s, spent, [clock.batch([t.recipe for t in batch[:keep]])], tried or keep > 1):
        keep -= 1
    why = over_budget(budget_s, spent, [clock.batch([t.recipe for t in batch[: keep + 1]])]) if keep < len(batch) else None
    not_run = [t.model_copy(update={"state": "FAIL", "note": f"not run: {why}"}) for t in batch[keep:]]
    return batch[:keep], not_run


def run_search(spec: SweepSpec, info: TeacherInfo, variants, parent: str, exp_id: str,
               submit_batch: Callable[..., Any]) -> Searched:
    """Search until ``search.trials`` trials have trained (or ``search.minutes`` have passed):
    the spec's recipes first (seeds), then batches of ``parallel`` trials asked from the study.

    On a Dask runner two batches are in flight: batch k+1 is asked and submitted once batch k-1
    has been told, while batch k still runs, so workers that finish early start the next trials
    instead of waiting for a batch's longest one. What is asked (and what the pruner compares
    with) depends only on the batches told before: the same seed and workers give the same trials.
    Under a time budget (which already makes how many trials run depend on the machine) batches
    are collected as they end, not in the order they were submitted."""
    log = get_run_logger()
    s = spec.search_or_default()
    start = time.perf_counter()  # the time budget (search.minutes) counts the sensitivity pass too
    space, sens, per_sample = engine.space_task(spec)
    pruner = engine.pruner_spec(spec, sens.baseline)
    identity = engine.space_identity(space, info.outputs_key)
    study = engine.open_study(spec, pruner, identity)
    if study.study_name != engine.study_name(spec):
        log.info("search: study %s holds trials of another space or teacher; kept as it was, this search uses %s",
                 engine.study_name(spec), study.study_name)
    study.set_user_attr("teacher_bytes", info.baseline.report.size_bytes)  # the score's size scale (search.score)
    trials, interrupted = engine.resume(study)
    untrained = engine.enqueue_untrained(study, space)
    if untrained:
        log.info("search %s: the first %s the teacher with %s (post-training quantization, no training)",
                 study.study_name, "trial is" if len(untrained) == 1 else f"{len(untrained)} trials are",
                 ", ".join(untrained))
    if trials:
        log.info("search %s: resuming; %d trials finished before (%d of them interrupted)", study.study_name,
                 len(trials), len(interrupted))
    if interrupted:
        engine.record_task(parent, exp_id, study.study_name, interrupted)
    counts: collections.Counter[str] = collections.Counter()
    seeds: list[VariantResult] = []
    if info.recipes:
        seeds, done = submit_batch(spec, info, variants, parent, exp_id, info.recipes).collect()
        counts.update(done)
    k = engine.parallel(spec)
    workers = spec.workers if spec.runner == "dask" else 1
    clock = Clock(per_sample=per_sample, workers=workers, n_train=space.train_samples)
    ahead = 1 if spec.runner == "dask" else 0  # batches in flight beside the one being collected
    # each batch in flight: its trials, its future, when it was submitted, its raw estimate, whether it trains
    flight: collections.deque[tuple[list[engine.Trial], Any, float, float, bool]] = collections.deque()
    batch_seconds: list[float] = []  # submission to collection, each batch so far
    asking = True
    waiting = False  # a batch was cut short for the time budget: ask again once one in flight is collected
    while True:
        running = [t for batch, *_ in flight for t in batch]
        left = s.trials - engine.trained(trials) - len(running)
        # Under a time budget, nothing more is asked until one batch is timed: a second batch in flight
        # could not be weighed against what is left of the budget (the first batch's untrained trials
        # are collected on their own, so that is seconds: see first_parts).
        if asking and not waiting and left > 0 and len(flight) <= (ahead if s.minutes is None or batch_seconds else 0):
            # tried: something was measured (a trial the size floor rejected was not)
            tried = bool(seeds or batch_seconds or any(t.result is not None and t.result.report is not None for t in trials))
            spent = time.perf_counter() - start
            if s.minutes is not None and (why := over_budget(s.minutes * 60, spent, [], tried)):
                log.info("search: %s; no new trials (%d left of %d)", why, left, s.trials)
                asking = False
                continue
            # Under a time budget the first batch is the untrained first trials (they time what every
            # trial costs besides training), filled up to one trial per worker: a worker left idle
            # while it runs would be wasted (and the size floor may reject the untrained ones).
            size = min(left, max(len(untrained), workers) if untrained and s.minutes is not None else k)
            untrained = []
            forced = s.minutes is not None and not tried and spent >= s.minutes * 60
            if forced:
                log.warning("search: the %g-minute budget was spent before any trial (the sensitivity pass took %.0f s); "
                            "one trial runs anyway", s.minutes, sens.seconds)
                size = 1
            batch, rejected = engine.ask_task(spec, space, pruner, identity, size, running)
            trials += rejected
            if rejected:
                engine.record_task(parent, exp_id, study.study_name, rejected)
            if not batch:
                log.info("search: the sampler found nothing new to try; stopping with %d trials left", left)
                asking = False
                continue
            if s.minutes is not None and not forced:
                batch, not_run = _within_budget(s.minutes * 60, start, batch, flight, clock, tried)
                if not_run:
                    # With a batch in flight (or this one's head), what it takes will say more of what
                    # is left: ask again once it is collected. With none, nothing will: stop.
                    again = bool(flight or batch)
                    log.info("search: %s; %d asked trials not run, %s", not_run[0].note, len(not_run),
                             "asking again once a batch in flight is collected" if again else "no new trials")
                    ended = engine.tell_task(spec, pruner, identity, not_run)
                    engine.record_task(parent, exp_id, study.study_name, ended)
                    trials += ended
                    waiting, asking = again, again
                if not batch:
                    continue
            # The pruner compares with the trials told before this batch was submitted, never with one
            # told while it runs (when its neighbours in flight finish is up to the machine).
            before = min(t.number for t in [*running, *batch])
            for part in first_parts(batch, clock) if s.minutes is not None and not batch_seconds else [batch]:
                watch = Watch(study.study_name, pruner.model_copy(update={"before": before}).model_dump(),
                              {t.recipe.name: t.number for t in part})
                recipes = [t.recipe for t in part]
                log.info("search: trials %s submitted, estimated %.1f s", ", ".join(str(t.number) for t in part),
                         clock.batch(recipes))
                flight.append((part, submit_batch(spec, info, variants, parent, exp_id, tuple(recipes), watch),
                               time.perf_counter(), clock.raw(recipes), clock.trains(recipes)))
            continue
        if not flight:
            break
        # Under a time budget (which already makes how many trials run depend on the machine) the
        # batch to collect is the first to end: a long trial (an ExecuTorch program of a recurrent
        # model takes a minute to build) must not hold the workers that finished beside it idle.
        # Without one, batches are collected in the order they were submitted: a repeatable search.
        i = 0
        if s.minutes is not None and len(flight) > 1:
            i = flight[0][1].first_ended([entry[1] for entry in flight], (engine.trained(trials), s.trials))
        batch, pending, submitted, _, trains = flight[i]
        del flight[i]
        results, done = pending.collect((engine.trained(trials), s.trials))
        waiting = False
        batch_seconds.append(time.perf_counter() - submitted)
        log.info("search: trials %s took %.1f s from submission", ", ".join(str(t.number) for t in batch),
                 batch_seconds[-1])
        clock.learn([t.recipe for t in batch], trains, batch_seconds[-1], results, pending.computed_prefixes())
        counts.update(done)
        ended = engine.tell_task(spec, pruner, identity, [_ended(t, r) for t, r in zip(batch, results, strict=True)])
        engine.record_task(parent, exp_id, study.study_name, ended)
        trials += ended
    stats = engine.stats(trials) | {"sensitivity_seconds": sens.seconds, "seeds": len(seeds)}
    log.info("search %s: %s", study.study_name, ", ".join(f"{k} {v:g}" for k, v in stats.items()))
    results = seeds + [t.result for t in sorted(trials, key=lambda t: t.number)
                       if t.result is not None and not t.note.startswith("repeat")]
    return Searched(results=results, counts=dict(counts), trials=trials, study=study.study_name, stats=stats,
                    space=space.describe())


def publish(parent: str, searched: Searched, results: list[VariantResult], sel: Selection) -> None:
    """The front the winner was chosen from, as a Prefect artifact and on the MLflow parent run."""
    engine.publish_task(parent, searched.study, searched.stats, searched.space, searched.trials, results, sel)

