"""The search engine: an Optuna study over the space shrinkflow.search derives, run as the compress
flow's trials.

- Storage: one Optuna RDB storage beside MLflow's tracking (:func:`tasks.config.search_storage`):
  a crashed or killed search, rerun with the same spec, resumes its study: finished trials are
  read back (with their results), interrupted ones are marked failed and asked again.
- Batches: the flow asks ``parallel`` trials, runs them (their steps as the sweep's tasks on the
  workers), and tells them all once the batch is done, in trial order. The sampler (seeded) sees
  the same history at every ask, so the same seed and ``parallel`` give the same trials.
- Pruning: while a trial trains, each validation score is reported to its Optuna trial from the
  worker (:class:`TrialMonitor`); the pruner stops a trial that falls behind. For best-quality it
  is Optuna's PercentilePruner (the median of the completed trials at the same training step and
  epoch): it compares with COMPLETE trials only, which here are the earlier batches', so pruning is
  reproducible (Successive Halving compares with trials still running, which is not). For the
  other objectives a small model is not worse for scoring lower, so only a trial whose score falls
  below the quality floor (teacher - 3 x max_quality_drop) is stopped (ThresholdPruner).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import statistics

import optuna
from optuna.trial import TrialState
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shrinkflow import budget, pipeline, search, sensitivity, steps
from shrinkflow.errors import TrialStopped
from shrinkflow.measure import threads
from shrinkflow.specs import (
    Frozen,
    Recipe,
    SearchSpec,
    Selection,
    SweepSpec,
    VariantResult,
)
from tasks import config, tracking

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: Training steps report to the pruner at 1000 x (10 x position in the chain + kind) + epoch, so a
#: score is only ever compared with scores of the same kind of training at the same epoch.
KIND_CODE = {"distill": 1, "prune": 2, "finetune": 3, "vocab": 4}

#: How a trial that :func:`_enqueue_reuse` added is marked: it trains nothing of its own.
REUSE_NOTE = "reuses trial"


class MedianBefore(optuna.pruners.BasePruner):
    """Optuna's median rule (``PercentilePruner(50)``: a trial whose best validation score so far is
    below the median of the completed trials' scores at the same step is stopped), judged against
    the trials completed *before* trial number ``before`` only. A batch of trials runs while the
    batch before it is still being told; this keeps what stops a trial independent of when the
    trials beside it finish (the search stays repeatable)."""

    def __init__(self, before: int | None, n_startup: int, n_min: int = 2) -> None:
        self.before, self.n_startup, self.n_min = before, n_startup, n_min

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if self.before is None or t.number < self.before]
        others = [t.intermediate_values[step] for t in done if step in t.intermediate_values]
        if len(done) < self.n_startup or len(others) < self.n_min:
            return False
        own = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        return not own or max(own) < statistics.median(others)


class PrunerSpec(Frozen):
    """How trials are stopped early (the same in the flow and in every worker)."""

    kind: str  # "percentile" | "threshold" | "none"
    n_startup: int = 2
    lower: float | None = None
    before: int | None = None  # percentile: judge against trials numbered below this only

    def build(self) -> optuna.pruners.BasePruner:
        if self.kind == "percentile":
            return MedianBefore(self.before, self.n_startup)
        if self.kind == "threshold":
            return optuna.pruners.ThresholdPruner(lower=self.lower)
        return optuna.pruners.NopPruner()


class Trial(Frozen):
    """One trial as the flow sees it: its number, its recipe, and (once told) how it ended."""

    number: int
    recipe: Recipe | None = None
    state: str = "RUNNING"
    note: str = ""
    result: VariantResult | None = None


def storage() -> optuna.storages.RDBStorage:
    """The search storage (:func:`tasks.config.search_storage`), one per URL and process: opening
    one checks (or creates) Optuna's schema, too slow to repeat for every trial told."""
    return _storage(config.search_storage())


@functools.lru_cache(maxsize=4)
def _storage(url: str) -> optuna.storages.RDBStorage:
    """On PostgreSQL the schema is created first when the URL names one (``options=-csearch_path=<schema>``)."""
    if url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    schema = re.search(r"search_path(?:%3D|=)(\w+)", url)
    if schema:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema.group(1)}"'))
        engine.dispose()
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def study_name(spec: SweepSpec) -> str:
    """One study per spec: what is searched, not how long or how (the trial and time budgets, the
    batch size, runner and workers are left out), so the same spec run again, or with a larger
    budget, resumes it."""
    what = spec.model_dump(mode="json", exclude={"runner", "workers", "dask_address"})
    what["search"] = {k: v for k, v in spec.search_or_default().model_dump(mode="json").items()
                      if k not in ("trials", "minutes", "parallel")}
    return f"{spec.name}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]}"


def parallel(spec: SweepSpec) -> int:
    """Trials per batch: ``search.parallel``, else twice the Dask workers (with two trials per
    worker, Dask packs the short ones beside a long one), else 1."""
    s = spec.search_or_default()
    return s.parallel or (2 * spec.workers if spec.runner == "dask" else 1)


def pruner_spec(spec: SweepSpec, baseline: float) -> PrunerSpec:
    s, (_, limits) = spec.search_or_default(), budget.resolve(spec.device, spec.budget)
    if not s.prune_trials:
        return PrunerSpec(kind="none")
    if spec.objective == "best-quality":
        return PrunerSpec(kind="percentile", n_startup=parallel(spec))
    drop = limits.max_quality_drop if limits.max_quality_drop is not None else 0.01 * abs(baseline)
    return PrunerSpec(kind="threshold", lower=baseline - 3 * drop)


def sampler(s: SearchSpec, seed: int, n_startup: int) -> optuna.samplers.BaseSampler:
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True, group=True)


def space_identity(space: search.Space, teacher_key: str) -> str:
    """What a study's trials were drawn from: the derived space (its parameters' choices and what
    they build) and the teacher (its weights and data, as the key of its cached outputs)."""
    what = {"space": space.model_dump(mode="json", exclude={"why"}), "teacher": teacher_key}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def open_study(spec: SweepSpec, pruner: PrunerSpec, identity: str) -> optuna.Study:
    """The spec's study, created on first use, for the space and teacher ``identity`` names
    (:func:`space_identity`). A study of the spec's name that holds trials of another space or
    teacher (a retrained teacher, a version that derives another space) is left as it was: its
    trials say nothing of this one, and Optuna refuses a parameter whose choices changed. The
    search then uses the study named by the spec and the identity, ``<name>-<identity[:8]>``.
    Its sampler is seeded with the spec's seed and the number of trials the study holds: a sampler
    made afresh for each batch then draws new points, and the same history gives the same draws
    (what makes a search, and its resumption, repeatable)."""
    s = spec.search_or_default()
    for name in (study_name(spec), f"{study_name(spec)}-{identity[:8]}"):
        study = optuna.create_study(study_name=name, storage=storage(), direction="maximize",
                                    pruner=pruner.build(), load_if_exists=True)
        held = study.user_attrs.get("space")
        if held is None and not study.get_trials(deepcopy=False):
            study.set_user_attr("space", identity)
            break
        if held == identity:
            break
    history = len(study.get_trials(deepcopy=False))
    study.sampler = sampler(s, spec.seed * 1_000_003 + history, max(4, min(8, s.trials // 3)))
    return study


def enqueue_untrained(study: optuna.Study, space: search.Space) -> list[str]:
    """On a study that holds no trial yet: the teacher with post-training quantization as its first
    trials, which train nothing (each costs one quantization and one measurement), so a short
    search starts from a variant that often fits and the sampler from a measured reference
    (:func:`shrinkflow.search.first_untrained`: int8 when the teacher's size estimate fits the limit
    under it, else the first option it fits under, else int8 all the same), with its siblings the
    teacher fits under: its ``-fit`` option (within the estimate's slack the first may measure just
    over the limit) and the ``-band`` options (more layers in int4, within rungs of the tie
    tolerance: the best-quality rule ships the smallest that measures within it). MiniLM on
    phone-entry: ``xnn-int4``, ``xnn-int4-fit``, ``xnn-int4-fit-band50``, ``xnn-int4-fit-band100``.
    Returns the options enqueued (none when the teacher's shape is out of the space)."""
    if study.get_trials(deepcopy=False) or "teacher" not in space.students:
        return []
    names = [o.name for o in space.quant]
    options = [name] if (name := search.first_untrained(names, space.teacher_fits)) is not None else []
    options += [sibling for name in options for sibling in space.teacher_fits if sibling.startswith(f"{name}-")]
    for option in options:
        study.enqueue_trial({"student": "teacher", "prune": "none", "quant": option})
    return options


# ---------------------------------------------------------------- in the flow process


@task(name="search-space", cache_policy=NO_CACHE)
def space_task(spec: SweepSpec) -> tuple[search.Space, sensitivity.Sensitivity, float]:
    """The sensitivity pass (cached per teacher), the space derived from it, model and budget, and
    the teacher's training seconds per sample here (:func:`search.train_seconds_per_sample`)."""
    from tasks.compress import TRAIN_THREADS, context

    log = get_run_logger()
    ctx = context(**spec.workload_args())
    profile, limits = budget.resolve(spec.device, spec.budget)
    s = spec.search_or_default()
    runtimes = tuple(r for r in profile.runtimes if s.runtime in (None, r))
    options = sensitivity.quant_options(ctx.workload.teacher, runtimes)
    with threads(TRAIN_THREADS):
        sens = sensitivity.sensitivity(ctx, options)
        rate = search.train_seconds_per_sample(ctx)
    space = search.derive(ctx, profile, limits, sens, options, s,
                          spec.quality_tolerance if spec.objective == "best-quality" else None)
    if len(space.students) > 1 or len(space.prune_methods) > 1:  # trials will train against the teacher:
        log.info("teacher outputs %s: %d forward samples (0 = cache hit)",  # once, here, before any worker needs them
                 ctx.teacher_key[:12], ctx.teacher_out.forward_samples)
    log.info("search space: %s (sensitivity: %d groups, %d layers probed alone, %.1f s%s)", space.describe(),
             len(sens.groups), sum(map(len, sens.layers.values())), sens.seconds, "" if sens.seconds else ", cached")
    for what, why in space.why.items():
        log.info("search: left out %s: %s", what, why)
    return space, sens, rate


def resume(study: optuna.Study) -> tuple[list[Trial], list[Trial]]:
    """The study's finished trials as records, and those of them just marked failed: the trials a
    crashed or killed run left RUNNING (the search asks new ones in their place)."""
    interrupted = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        recipe = Recipe.model_validate_json(t.user_attrs["recipe"]) if "recipe" in t.user_attrs else None
        interrupted.append(_tell_one(study, Trial(number=t.number, recipe=recipe, state="FAIL",
                                                  note="interrupted: the run it was part of ended first"), None))
        logger.info("trial %d was interrupted: marked failed", t.number)
    return finished(study), interrupted


def finished(study: optuna.Study) -> list[Trial]:
    """The study's finished trials as records: recipe, state, note and result."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        recipe = Recipe.model_validate_json(t.user_attrs["recipe"]) if "recipe" in t.user_attrs else None
        result = VariantResult.model_validate_json(t.user_attrs["result"]) if "result" in t.user_attrs else None
        out.append(Trial(number=t.number, recipe=recipe, state=t.state.name, note=t.user_attrs.get("note", ""),
                         result=result))
    return out


def trained(trials: list[Trial]) -> int:
    """Trials that cost training (a size-floor rejection, the teacher itself, a repeat, or a trial that
    reuses another's training under another quantization cost nothing)."""
    free = ("repeat", "interrupted", "not run", REUSE_NOTE)
    return sum((t.state in ("COMPLETE", "FAIL") and not t.note.startswith(free)) or
               (t.state == "PRUNED" and t.note.startswith("pruned")) for t in trials)


def _ident(recipe: Recipe) -> str:
    """A recipe's identity, whatever its trial-numbered name."""
    return recipe.model_dump_json(include={"steps", "runtime"})


@task(name="ask", cache_policy=NO_CACHE)
def ask_task(spec: SweepSpec, space: search.Space, pruner: PrunerSpec, identity: str, count: int,
             running: list[Trial] = ()) -> tuple[list[Trial], list[Trial]]:
    """``count`` trials to train, and the ones rejected before training on the way (told at once:
    their recipe cannot fit the size limit, is the teacher itself, or is being trained by one of
    the ``running`` trials, asked earlier and not told yet)."""
    from tasks.compress import context

    study, ctx = open_study(spec, pruner, identity), context(**spec.workload_args())
    profile, limits = budget.resolve(spec.device, spec.budget)
    done = finished(study)
    earlier = {_ident(t.recipe): t for t in done if t.recipe is not None and t.state in ("COMPLETE", "PRUNED")}
    stopped = _stopped_prefixes(done)
    batch, rejected = [], []
    names = {_ident(t.recipe): t.number for t in running if t.recipe is not None}
    _enqueue_reuse(study, space, spec, done, set(earlier) | set(names), count)
    for _ in range(count * 25):
        if len(batch) == count:
            break
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):  # the reuse and untrained ones asked
            _enqueue_start(study, space, spec, done + rejected, count - len(batch))
        trial = study.ask()
        reuses = trial.user_attrs.get("reuses")
        recipe = search.suggest(trial, space)
        if recipe is not None and (seen := earlier.get(_ident(recipe))) is not None:
            # The sampler came back to a point already tried: the study learns its result again, no training.
            rejected.append(_tell_one(study, seen.model_copy(update={"number": trial.number, "recipe": recipe,
                                                                      "note": f"repeat of trial {seen.number}"}),
                                      spec))
            continue
        why = "the teacher itself (already measured)" if recipe is None else pipeline.precheck(ctx, recipe, limits, profile)
        if why is None and (was := _prefix_stopped(recipe, stopped)) is not None:
            why = f"its training prefix was stopped by the pruner in trial {was}"
        if why is None and (same := names.get(_ident(recipe))) is not None:
            why = f"the same recipe as trial {same}, not finished yet"
        if why is not None:
            note = f"size floor: {why}" if "max_size_mb" in why else f"skipped: {why}"
            rejected.append(_tell_one(study, Trial(number=trial.number, recipe=recipe, state="PRUNED", note=note), spec))
            continue
        names[_ident(recipe)] = trial.number
        trial.set_user_attr("recipe", recipe.model_dump_json())
        batch.append(Trial(number=trial.number, recipe=recipe,
                           note="" if reuses is None else f"{REUSE_NOTE} {reuses}'s training, quantized another way"))
    return batch, rejected


def _enqueue_reuse(study: optuna.Study, space: search.Space, spec: SweepSpec, done: list[Trial], tried: set[str],
                   count: int) -> None:
    """Before a batch is asked: take the best trial so far (by its score) that fits the budget and
    trained something, and queue up to ``count`` trials of its training prefix under other
    quantization options (:func:`shrinkflow.search.reuse_params`) not ``tried`` yet (recipe
    identities, finished or running). Its training is cached, so each costs a quantization and a
    measurement; on a short budget they are what turns a well-trained model into the smallest
    program that keeps its quality. The teacher's own quantizations are not among them: those
    the teacher may fit under were queued first (:func:`enqueue_untrained`). Depends only on the
    trials told so far, so the search stays repeatable."""
    frozen = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    fitting = [t for t in done if t.number in frozen and t.result is not None and t.recipe is not None
               and t.result.verdict is not None and t.result.verdict.fits and steps.training_prefix(t.recipe)]
    if not fitting:
        return
    best = frozen[max(fitting, key=lambda t: (frozen[t.number].value, -t.number)).number]
    origin = best.user_attrs.get("reuses", best.number)  # the trial that trained it
    fresh = []
    for candidate in search.reuse_params(best.params, space, spec.objective):
        recipe = search.suggest(optuna.trial.FixedTrial(candidate, number=0), space)
        if recipe is not None and _ident(recipe) not in tried:
            tried.add(_ident(recipe))
            fresh.append(candidate)
    for candidate in fresh[:count]:
        study.enqueue_trial(candidate, user_attrs={"reuses": origin})


#: How a trial that :func:`_enqueue_start` added is marked (its user attribute ``start``).
START_ATTR = "start"


def _enqueue_start(study: optuna.Study, space: search.Space, spec: SweepSpec, done: list[Trial], count: int) -> None:
    """Once the trials queued before are asked (the teacher's untrained ones, the reuse trials of
    :func:`_enqueue_reuse`), fill the ``count`` places left in the batch with the search's start:
    students a parallel bisection of the space's student ladder picks
    (:func:`shrinkflow.search.start_points`), each distilled, unpruned, under the quantization the
    teacher is tried under first (:func:`shrinkflow.search.start_quant`). What each unpruned student
    tried so far says (:func:`shrinkflow.search.rung_outcome`) is read from the trials told (``done``,
    with those rejected while this batch is asked), and the students being trained, or asked for
    this batch, are left to finish: the start depends only on the trials told, so the search stays
    repeatable. The random sampler gets no start: it is the unguided baseline."""
    if spec.search_or_default().sampler == "random":
        return
    waiting = (TrialState.WAITING,)
    count -= len(study.get_trials(deepcopy=False, states=waiting))
    students = [s for s in space.students if s != "teacher"]
    if count <= 0 or not students:
        return
    params = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    unpruned = [t for t in done if params.get(t.number, {}).get("prune") == "none"]
    fitting = [search.quality_val(t.result) for t in done if t.result is not None and t.result.report is not None
               and t.result.verdict is not None and t.result.verdict.fits]
    best = max(fitting, default=None)
    outcomes: dict[str, str] = {}
    busy = {t.params.get("student") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.params.get("prune") == "none"}
    for t in sorted(unpruned, key=lambda t: t.number):
        student = params[t.number]["student"]
        outcome = search.rung_outcome(t.result, t.note, spec.objective, best, spec.quality_tolerance)
        if outcome is not None and outcomes.get(student) != "holds":
            outcomes[student] = outcome  # one holding trial of a student is enough (another quantization may not)
        elif outcome is None and t.note.startswith("failed"):
            busy.add(student)  # it failed to train: not picked again, and it says nothing of the others
    quant = search.start_quant(space)
    for student in search.start_points(space, outcomes, busy, count):
        study.enqueue_trial({"student": student, "distill_epochs": space.distill_epochs[0], "prune": "none",
                             "quant": quant}, user_attrs={START_ATTR: True})


def _stopped_prefixes(trials: list[Trial]) -> dict[str, int]:
    """The training prefixes the pruner stopped (up to the step it stopped in), by the trial stopped."""
    out = {}
    for t in trials:
        where = re.search(r"step (\d+) of the chain", t.note) if t.note.startswith("pruned:") and t.recipe else None
        if where:
            out.setdefault(steps.prefix_identity(steps.training_prefix(t.recipe)[: int(where.group(1))]), t.number)
    return out


def _prefix_stopped(recipe: Recipe, stopped: dict[str, int]) -> int | None:
    """The trial whose stopped prefix ``recipe`` would train again (the pruner would stop it there too)."""
    prefix = steps.training_prefix(recipe)
    return next((stopped[k] for i in range(1, len(prefix) + 1) if (k := steps.prefix_identity(prefix[:i])) in stopped), None)


def _tell_one(study: optuna.Study, t: Trial, spec: SweepSpec | None) -> Trial:
    """Record ``t``'s recipe, result and constraint on its Optuna trial, then tell how it ended."""
    s = storage()
    trial = optuna.trial.Trial(study, s.get_trial_id_from_study_id_trial_number(s.get_study_id_from_name(study.study_name),
                                                                                 t.number))
    measured = t.result is not None and t.result.report is not None
    trial.set_user_attr("note", t.note)
    if measured:  # the samplers' constraint: <= 0 when every limit is met
        trial.set_constraint("budget", search.violation(t.result))
    elif t.note.startswith("size floor"):
        trial.set_constraint("budget", 1.0)  # cannot fit, whatever training does
    if t.recipe is not None:
        trial.set_user_attr("recipe", t.recipe.model_dump_json())
    if t.result is not None:
        trial.set_user_attr("result", t.result.model_dump_json())
    state = TrialState[t.state]
    values = None
    if state == TrialState.COMPLETE:
        values = [search.score(t.result, spec.objective, spec.quality_tolerance, study.user_attrs.get("teacher_bytes"))]
    study.tell(t.number, values=values, state=state, skip_if_finished=True)
    return t


@task(name="tell", cache_policy=NO_CACHE)
def tell_task(spec: SweepSpec, pruner: PrunerSpec, identity: str, trials: list[Trial]) -> list[Trial]:
    """Tell the study how each trial of a batch ended, in trial order (after the whole batch)."""
    study = open_study(spec, pruner, identity)
    return [_tell_one(study, t, spec) for t in sorted(trials, key=lambda t: t.number)]


def stats(trials: list[Trial]) -> dict[str, float]:
    """Search efficiency: trials trained, completed, stopped by the pruner, failed, and rejected
    before training by the size floor (or as the teacher itself / a repeat)."""
    states = collections.Counter(t.state for t in trials)
    return {"trials_trained": trained(trials), "trials_complete": states["COMPLETE"],
            "trials_pruned": sum(t.state == "PRUNED" and t.note.startswith("pruned") for t in trials),
            "trials_failed": sum(t.state == "FAIL" and not t.note.startswith(("interrupted", "not run")) for t in trials),
            "trials_not_run": sum(t.state == "FAIL" and t.note.startswith("not run") for t in trials),
            "trials_interrupted": sum(t.note.startswith("interrupted") for t in trials),
            "trials_floor_skipped": sum(t.state == "PRUNED" and t.note.startswith("size floor") for t in trials),
            "trials_other_skipped": sum(t.state == "PRUNED" and t.note.startswith("skipped") for t in trials),
            "trials_reusing_training": sum(t.note.startswith(REUSE_NOTE) for t in trials)}


@task(name="record-trials", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def record_task(parent_run_id: str, experiment_id: str, study: str, trials: list[Trial]) -> None:
    """Every trial as an MLflow child run tagged with its study, number and state: its own variant
    run when it trained one; else a run made here (a reused result, a pruned or rejected trial)."""
    from mlflow.entities import RunTag

    c = tracking.client()
    for t in trials:
        tags = {"search.study": study, "search.trial": str(t.number), "search.state": t.state}
        if t.note:
            tags["search.note"] = t.note[:4000]
        r = t.result
        run_id = r.run_id if r is not None and r.run_id and not r.cache_hit else None
        if run_id is None:
            name = t.recipe.name if t.recipe is not None else f"t{t.number:03d}-teacher"
            run_id = tracking.start_child(parent_run_id, experiment_id, name, role="trial")
            if r is not None and r.report is not None:
                tracking.log_variant(run_id, r)
            if r is not None and r.run_id:
                tags["reused_run_id"] = r.run_id
            tracking.finish(run_id, "FINISHED" if t.state == "COMPLETE" else "KILLED")
        tracking.retrying(c.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])


@task(name="search-report", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_task(parent_run_id: str, study: str, numbers: dict[str, float], space: str, trials: list[Trial],
                 results: list[VariantResult], sel: Selection) -> str:
    """The search's front and efficiency: a Prefect artifact, and on the MLflow parent run its
    metrics and ``search.md`` (the Pareto plot is the sweep's ``pareto.png``)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.report import search_markdown

    text = search_markdown(study, numbers, space, trials, search.front(list(results)), sel)
    c = tracking.client()
    for key, value in numbers.items():
        tracking.retrying(c.log_metric, parent_run_id, f"search_{key}", float(value))
    tracking.retrying(c.log_text, parent_run_id, text, "search.md")
    create_markdown_artifact(text, key="search", description="The search: its Pareto front and its trials")
    return text


# ---------------------------------------------------------------- in a worker


class TrialMonitor:
    """Reports each validation score of a training prefix to the Optuna trials that depend on it,
    and stops the training (``TrialStopped``) when the pruner would stop every one of them."""

    def __init__(self, name: str, pruner: PrunerSpec, numbers: list[int]) -> None:
        s = storage()
        study = optuna.load_study(study_name=name, storage=s, pruner=pruner.build())
        study_id = s.get_study_id_from_name(name)
        ids = [s.get_trial_id_from_study_id_trial_number(study_id, n) for n in numbers]
        self.trials = [optuna.trial.Trial(study, i) for i in ids]
        # What each trial was told already: a chain's later prefix task replays its cached parent's
        # curve, which the parent's own task told the same trials (Optuna warns on a repeat).
        self.told = [set(s.get_trial(i).intermediate_values) for i in ids]
        self.seen: collections.Counter[int] = collections.Counter()
        self.history: list[tuple[int, float]] = []

    def __call__(self, step: steps.TrainingStep | None, score: float) -> None:
        if step is None or not self.trials:
            return
        epoch = self.seen[step.index]
        self.seen[step.index] += 1
        position = 1000 * (10 * step.index + KIND_CODE.get(step.kind, 9)) + epoch
        for trial, told in zip(self.trials, self.told, strict=True):
            if position not in told:
                trial.report(score, position)
                told.add(position)
        self.history.append((position, score))
        if epoch >= max(2, math.ceil(step.epochs / 3)) and all(trial.should_prune() for trial in self.trials):
            raise TrialStopped(f"pruned: validation {score:.4f} fell behind at epoch {epoch} of {step.kind} "
                                     f"(step {step.index + 1} of the chain)")


@contextlib.contextmanager
def monitoring(name: str, pruner: PrunerSpec, numbers: list[int]):
    """Install a :class:`TrialMonitor` for the training steps run inside (nothing without trials)."""
    token = steps.MONITOR.set(TrialMonitor(name, pruner, numbers) if numbers and pruner.kind != "none" else None)
    try:
        yield
    finally:
        steps.MONITOR.reset(token)
