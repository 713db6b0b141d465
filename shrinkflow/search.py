"""Budget-driven search: what to try on a model, derived from its layers, its sensitivity and the budget.

The engine (Optuna: its sampler, pruner and storage) is driven from ``tasks/search.py``; this
module is the model-side half it asks, pure PyTorch, with :mod:`shrinkflow.sensitivity` (the
layer groups, the quantization options and the sensitivity pass) and :mod:`shrinkflow.precision`
(each option's mixed precision):

* :func:`~shrinkflow.sensitivity.groups` splits a model into layer groups (a block's attention,
  its FFN, an embedding table, the head, a conv stage) from its module names.
* :func:`~shrinkflow.sensitivity.sensitivity` measures, once per teacher and cached
  content-addressed, the validation quality drop of each group quantized alone (by each scheme
  the space may use on it), of each layer taken to a low-bit scheme alone (int4, over the int8 the
  rest of the model gets: the unit of per-layer mixed precision), and of the whole model pruned,
  without fine-tuning, at a few ratios.
* :func:`derive` turns the model, that sensitivity, the device and the budget into a
  :class:`Space`: students (width x depth) whose size floor can fit, prune methods with the
  ratios fine-tuning can still recover from, quantization options with the groups that stay in
  float (mixed precision: the most sensitive groups are kept in float until the rest's summed
  drop is within half the allowed quality drop), and the runtimes the device runs.
* :func:`start_points` is the search's start: a parallel bisection of the students, ordered by
  parameters (:func:`ladder`), for the smallest that holds (:func:`rung_outcome`), before the
  sampler takes over.
* :func:`suggest` turns one trial (anything with Optuna's ``suggest_categorical`` and
  ``suggest_float``) into a :class:`Recipe`; :func:`score` and :func:`violation` are what a
  finished trial reports back (a value to maximise, and a constraint that is <= 0 when every
  limit of the budget is met).
"""

from __future__ import annotations

import copy
import logging
import re
import time

from pydantic import Field
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from shrinkflow import steps
from shrinkflow.budget import MB, DeviceProfile
from shrinkflow.errors import ShrinkflowError, SpecError
from shrinkflow.layerwise import TERMS, find_blocks, shallower
from shrinkflow.precision import band_low_bits, fit_low_bits, with_groups
from shrinkflow.quantize import INT4_GROUP, SCHEMES, estimated_bytes
from shrinkflow.sensitivity import SEARCHED_RUNTIMES, QuantOption, Sensitivity
from shrinkflow.specs import (
    Budget,
    DistillSpec,
    FinetuneSpec,
    Frozen,
    PruneSpec,
    Recipe,
    SearchSpec,
    SweepSpec,
    VariantResult,
)

logger = logging.getLogger(__name__)

#: A prune ratio is searched when, before any fine-tuning, it keeps at least this share of the
#: teacher's validation quality: past that, fine-tuning a few epochs rarely brings it back.
RECOVERABLE = 0.5
#: Student shapes tried when the workload can build students: width and depth fractions.
WIDTHS = (0.5, 0.35, 0.25, 0.15, 0.1)
DEPTHS = (1.0, 0.67)
#: Depths of students made of a transformer teacher's own layers (no student factory).
LAYER_DEPTHS = (0.67, 0.5)
#: Distillation length (epochs, with early stopping; the pruner stops a student that falls behind
#: after a third of them). One length, so that trials differing only after the distillation share
#: it from the prefix cache instead of training a student again.
DISTILL_EPOCHS = (60,)
#: A training split larger than this is not walked whole per epoch: each epoch of a trial's
#: distillation draws this many random samples, and there are LARGE_DISTILL_EPOCHS of them; a
#: fine-tune after pruning draws half as many, LARGE_FINETUNE_EPOCHS times (MiniLM's hand-written
#: recipes: 3 x 4,096 and 2 x 2,048). Sixty epochs of 35,652 MiniLM sentences would take hours.
LARGE_SPLIT = 4096
LARGE_DISTILL_EPOCHS = 4
LARGE_FINETUNE_EPOCHS = 2
#: Students of a transformer on a large split keep the teacher's trained layers: they are tuned
#: gently (AdamW at 3e-4, cosine). The default (3e-3, one-cycle) suits students trained from their
#: initialisation. Measured on MiniLM's 3-layer student, 3 x 4,096 samples, hidden-state and
#: relation terms (mean cosine in domain / out of domain): 1e-4 0.876 / 0.753, 3e-4 0.892 / 0.760;
#: hidden states only: 1e-4 0.877 / 0.759, 3e-4 0.893 / 0.769, 1e-3 (word embeddings frozen) 0.882 / 0.740.
PRETRAINED_DISTILL = {"lr": 3e-4, "scheduler": "cosine"}


# ---------------------------------------------------------------- the teacher's training rate


#: Samples in each of the two batches :func:`train_seconds_per_sample` runs (the first untimed).
RATE_BATCH = 32


def train_seconds_per_sample(ctx: steps.Context) -> float:
    """What one training sample costs the teacher here (forward and backward, in this process's
    threads): the scale of a trial's time estimate before any trial has trained. Timed on a batch
    of samples spread over the training split, after an untimed one."""
    wl = ctx.workload
    n = len(wl.train)
    b = max(1, min(RATE_BATCH, n // 2))
    picks = torch.linspace(0, n - 1, 2 * b).long().tolist()
    model = copy.deepcopy(wl.teacher).train()
    seconds = 0.0
    try:
        for i, batch in enumerate(DataLoader(Subset(wl.train, picks), batch_size=b)):
            t0 = time.perf_counter()
            out = model(*batch[: wl.n_inputs])
            if out.requires_grad:
                out.float().square().mean().backward()
            seconds = time.perf_counter() - t0 if i else 0.0
    except Exception as exc:  # noqa: BLE001 - e.g. BatchNorm on a one-sample batch: the estimate then starts at 0
        logger.warning("search: could not time a training batch of the teacher (%s: %s); trial estimates start "
                       "from the untrained trial's time alone", type(exc).__name__, exc)
        return 0.0
    return seconds / b


# ---------------------------------------------------------------- the space


class Space(Frozen):
    """What the search may try on one model under one budget (see :func:`derive`)."""

    students: tuple[str, ...] = Field((), description="'teacher' (no distillation) and 'w<width>-d<depth>' students.")
    student_params: dict[str, int] = Field(default_factory=dict, description="Each student's parameters (the "
                                           "teacher's included): the order of the search's start (:func:`start_points`).")
    distill_epochs: tuple[int, ...] = DISTILL_EPOCHS
    samples_per_epoch: int | None = Field(None, description="Samples per distillation epoch (None: the whole split).")
    train_samples: int = Field(0, description="Samples in the training split (a trial's time estimate).")
    distill_schedule: dict[str, float | str] = Field(default_factory=dict, description="lr and scheduler, if not the default.")
    distill_loss: str = "kd"
    distill_init: str = Field("student", description="'student': the workload's factory; 'parent': the teacher's layers.")
    layerwise: bool = Field(False, description="Transformer: students also learn hidden states and attention relations.")
    prune_methods: tuple[str, ...] = ("none",)
    prune_ratios: dict[str, tuple[float, float]] = Field(default_factory=dict, description="method -> (low, high)")
    finetune: FinetuneSpec = Field(default_factory=lambda: FinetuneSpec(epochs=6, scheduler="cosine"))
    quant: tuple[QuantOption, ...] = ()
    teacher_fits: tuple[str, ...] = Field((), description="The quantization options under which the teacher itself "
                                          "is estimated to fit max_size_mb (no limit: all): tried first, they train nothing.")
    quant_bytes: dict[str, int] = Field(default_factory=dict, description="Each quantization option's weights on the "
                                        "teacher, estimated (quantize.estimated_bytes): how options compare in size.")
    why: dict[str, str] = Field(default_factory=dict, description="What was left out of the space, and why.")

    def describe(self) -> str:
        parts = [f"students {len(self.students)}", f"prune {'/'.join(self.prune_methods)}",
                 f"quantization {'/'.join(o.name for o in self.quant)}"]
        return "; ".join(parts)


def _student_name(width: float, depth: float) -> str:
    return f"w{width * 100:g}-d{depth * 100:g}"


def _student_shape(name: str) -> tuple[float, float]:
    w, d = re.fullmatch(r"w([\d.]+)-d([\d.]+)", name).groups()
    return float(w) / 100, float(d) / 100


def _fits_floor(params: int, bytes_per: float, limits: Budget) -> bool:
    return limits.max_size_mb is None or params * bytes_per * 0.5 <= limits.max_size_mb * MB


def _bytes_per_param(model: nn.Module, best_bytes: float) -> float:
    """``best_bytes`` per parameter of ``model`` at best, where 4-bit codes take only the layers
    whose rows are whole int4 groups (Linear inputs, embedding widths); the others get int8."""
    if best_bytes >= 1.0:
        return best_bytes
    total = sum(p.numel() for p in model.parameters()) or 1
    grouped = sum(m.weight.numel() for m in model.modules()
                  if (isinstance(m, nn.Linear) and m.in_features % INT4_GROUP == 0)
                  or (isinstance(m, nn.Embedding) and m.embedding_dim % INT4_GROUP == 0))
    return (grouped * best_bytes + (total - grouped)) / total


FIRST_QUANT = ("int8", "xnn-int8")


def first_untrained(names: list[str], teacher_fits: tuple[str, ...]) -> str | None:
    """The option (of ``names``) the teacher is tried under first, untrained: int8 (the point every
    engineer tries first) when its size estimate fits the limit, else the first option in
    ``teacher_fits``, else int8 all the same (a measured reference); None without any of those."""
    first = [name for name in FIRST_QUANT if name in names][:1]
    fitting = [name for name in (*first, *teacher_fits) if name in names and name in teacher_fits]
    return next(iter(fitting or first), None)


def derive(ctx: steps.Context, profile: DeviceProfile, limits: Budget, sens: Sensitivity,
           options: list[QuantOption], search: SearchSpec, tolerance: float | None = None) -> Space:
    """The search space for ``ctx``'s teacher on ``profile`` under ``limits`` (module docstring).
    ``tolerance``: the best-quality rule's tie band (the sweep's ``quality_tolerance``; None for
    another objective), which the option the teacher is tried under first explores with its
    ``-band`` siblings (:func:`~shrinkflow.precision.band_low_bits`)."""
    wl, teacher, why = ctx.workload, ctx.workload.teacher, {}
    allowed = (limits.max_quality_drop if limits.max_quality_drop is not None else 0.01 * abs(sens.baseline)) / 2
    quant = []
    for option in options:
        if option.probe in sens.refused:
            why[option.name] = f"{option.probe} does not apply to this model: {sens.refused[option.probe]}"
            continue
        shaped = with_groups(option, sens, teacher, allowed)
        if option.steps and not shaped.steps:
            why[option.name] = (f"{option.low_bits} could not be probed: {sens.refused[option.low_bits]}"
                                if option.low_bits in sens.refused else
                                f"no layer loses under {allowed / 2:g} of quality with {option.low_bits}")
            continue
        quant.append(shaped)
    if not quant:
        raise ShrinkflowError(f"search: no runtime of device {profile.name!r} ({', '.join(profile.runtimes)}) is left "
                              f"with search.runtime={search.runtime!r}; expected a runtime the device runs.")
    methods, ratios = ["none"], {}
    for method, drops in sens.prune.items():
        ok = [float(r) for r, d in drops.items() if sens.baseline - d >= RECOVERABLE * sens.baseline]
        if method in sens.refused or not ok:
            why[method] = sens.refused.get(method, f"every probed ratio keeps under {RECOVERABLE:.0%} of the quality")
            continue
        methods.append(method)
        ratios[method] = (0.2, max(ok))
    if limits.max_size_mb is not None:
        for option in [o for o in quant if o.low_bits]:
            fit, reason = fit_low_bits(option, sens, teacher, limits.max_size_mb * MB)
            if fit is not None:
                quant.append(fit)
            elif reason:
                why[f"{option.name}-fit"] = reason
    # The estimate was 0-6% above the programs measured (quantize.ESTIMATE_SCALE_BYTES); 5% of slack.
    teacher_fits = tuple(o.name for o in quant if o.steps and (
        limits.max_size_mb is None or estimated_bytes(teacher, o.steps) <= 1.05 * limits.max_size_mb * MB))
    # The bands start from the first option's -fit sibling where it has one: within the estimate's
    # slack the first option itself may measure just over the limit.
    first = first_untrained([o.name for o in quant], teacher_fits)
    anchor = next((o for name in (f"{first}-fit", first) for o in quant if o.name == name and name in teacher_fits), None)
    if tolerance and anchor is not None and anchor.low_bits:
        bands = band_low_bits(anchor, sens, teacher, tolerance)
        quant += bands
        teacher_fits += tuple(b.name for b in bands)
    best_bytes = min([4.0] + [SCHEMES[s.scheme].weight_bits / 8 for o in quant for s in o.steps])
    sparsest = 1.0 - ratios.get("magnitude-global", (0.0, 0.0))[1]  # unstructured zeros entropy-code away
    students, params = ["teacher"], {"teacher": sum(p.numel() for p in teacher.parameters())}
    if not _fits_floor(int(params["teacher"] * sparsest), _bytes_per_param(teacher, best_bytes), limits):
        students.remove("teacher")
        why["teacher"] = "the teacher's architecture cannot fit max_size_mb, even pruned and quantized; students only"
    blocks = find_blocks(teacher)
    init = "student"
    if wl.make_student is not None:
        shapes = [(w, d) for w in WIDTHS for d in DEPTHS]
        built, refused = _factory_students(wl.make_student, shapes)
        if not built and blocks is not None and len(blocks) > 1:
            # A factory that keeps the teacher's width (MiniLM's drops layers): its students are depths.
            built, _ = _factory_students(wl.make_student, [(1.0, d) for d in LAYER_DEPTHS])
            depths = {}  # a shallow teacher: two depths that keep the same layer count are one student
            for shape, student in built:
                depths.setdefault(len(find_blocks(student) or ()), (shape, student))
            built = list(depths.values())
        if refused:
            why["student shapes"] = (f"the workload's student factory refused {len(refused)} of {len(shapes)} shapes "
                                     f"({', '.join(refused)}): {next(iter(refused.values()))}")
        for (w, d), student in built:
            if _fits_floor(n := sum(p.numel() for p in student.parameters()), _bytes_per_param(student, best_bytes), limits):
                students.append(_student_name(w, d))
                params[_student_name(w, d)] = n
    elif blocks is not None and len(blocks) > 1:  # a transformer without a factory: its own layers, fewer of them
        init, seen = "parent", set()
        for d in LAYER_DEPTHS:
            student = shallower(teacher, d)
            if (depth := len(find_blocks(student))) in seen:  # a shallow teacher: two depths that keep the same layers
                continue
            seen.add(depth)
            if _fits_floor(n := sum(p.numel() for p in student.parameters()), _bytes_per_param(student, best_bytes), limits):
                students.append(_student_name(1.0, d))
                params[_student_name(1.0, d)] = n
    else:
        why["students"] = "the workload cannot build students (no make_student, and no transformer layers to drop)"
    if not students:
        raise ShrinkflowError(f"search: nothing the search can build fits max_size_mb={limits.max_size_mb} (field "
                              "budget.max_size_mb); expected a larger limit, or a workload that builds smaller students.")
    loss = "kd" if wl.task == "classification" else "cosine"
    large = isinstance(wl.train, TensorDataset) and len(wl.train) > LARGE_SPLIT
    ft = FinetuneSpec(epochs=LARGE_FINETUNE_EPOCHS if large else 6, scheduler="cosine",
                      kd_alpha=0.5 if wl.task == "classification" else 1.0,
                      samples_per_epoch=LARGE_SPLIT // 2 if large else None)
    epochs = (search.epochs,) if search.epochs else (LARGE_DISTILL_EPOCHS,) if large else DISTILL_EPOCHS
    return Space(students=tuple(students), student_params={k: params[k] for k in students}, distill_loss=loss, distill_init=init, layerwise=blocks is not None,
                 distill_epochs=epochs, samples_per_epoch=LARGE_SPLIT if large else None, train_samples=len(wl.train),
                 distill_schedule=PRETRAINED_DISTILL if large and blocks is not None else {},
                 prune_methods=tuple(methods), prune_ratios=ratios, finetune=ft, quant=tuple(quant),
                 teacher_fits=teacher_fits if "teacher" in students else (),
                 quant_bytes={o.name: estimated_bytes(teacher, o.steps) for o in quant}, why=why)


def _factory_students(make_student, shapes: list[tuple[float, float]]
                      ) -> tuple[list[tuple[tuple[float, float], nn.Module]], dict[str, str]]:
    """The students ``make_student`` builds for ``shapes`` (width, depth), and the shapes it refuses
    (a SpecError: a factory may support only some widths or depths) with its message, by name."""
    built, refused = [], {}
    for w, d in shapes:
        try:
            built.append(((w, d), make_student(w, d)))
        except SpecError as exc:
            refused[_student_name(w, d)] = str(exc)
    return built, refused


def check(spec: SweepSpec, profile: DeviceProfile) -> None:
    """Refuse, before anything runs or is written, a search whose fixed parts the device contradicts."""
    runtime = spec.search.runtime if spec.search is not None else None
    if spec.searching and runtime is not None and runtime not in profile.runtimes:
        raise SpecError(f"Invalid value {runtime!r} for field 'search.runtime': device {profile.name!r} runs only "
                        f"{list(profile.runtimes)}; expected one of them, or no runtime.")
    if spec.searching and runtime is not None and runtime not in SEARCHED_RUNTIMES:
        raise SpecError(f"Invalid value {runtime!r} for field 'search.runtime': the search builds programs for "
                        f"{list(SEARCHED_RUNTIMES)}; expected one of them (an {runtime!r} variant is a hand-written recipe).")


# ---------------------------------------------------------------- trials


def suggest(trial, space: Space) -> Recipe | None:
    """The recipe ``trial`` picks from ``space`` (None: the teacher unchanged); the parameter names are stable (they are the
    study's), and conditional ones are asked only when they apply."""
    chain, name = [], []
    student = trial.suggest_categorical("student", list(space.students))
    if student != "teacher":
        width, depth = _student_shape(student)
        epochs = trial.suggest_categorical("distill_epochs", list(space.distill_epochs))
        layers = TERMS if space.layerwise else {}
        chain.append(DistillSpec(width=width, depth=depth, loss=space.distill_loss, epochs=epochs, init=space.distill_init,
                                 samples_per_epoch=space.samples_per_epoch, **space.distill_schedule, **layers))
        name.append(f"kd-{student}-e{epochs}")
    method = trial.suggest_categorical("prune", list(space.prune_methods))
    if method != "none":
        low, high = space.prune_ratios[method]
        ratio = round(trial.suggest_float(f"prune_ratio_{method}", low, high, step=0.1), 2)
        chain.append(PruneSpec(method=method, ratio=ratio, finetune=space.finetune))
        name.append(f"prune-{method.split('-')[1] if method.startswith('magnitude') else 'channels'}-{ratio * 100:g}")
    options = {o.name: o for o in space.quant}
    option = options[trial.suggest_categorical("quant", list(options))]
    chain.extend(option.steps)
    name.append(option.name)
    if not chain:
        return None  # the teacher itself: measured already, as the baseline
    return Recipe(name=f"t{trial.number:03d}-" + "+".join(name), steps=tuple(chain), runtime=option.runtime)


#: Objectives for which a smaller program is the better one at equal quality (best-quality's tie rule).
SIZE_OBJECTIVES = ("best-quality", "smallest")


def reuse_params(params: dict, space: Space, objective: str) -> list[dict]:
    """The trials that reuse a finished trial's training (``params``: its Optuna parameters) under
    the space's other quantization options: the same student and pruning, so the same cached
    training prefix, and only a quantization and a measurement to pay. For a size objective
    (:data:`SIZE_OBJECTIVES`) only the options estimated smaller than its own on the teacher
    (:attr:`Space.quant_bytes`), the smallest first; otherwise every other option, in the space's order."""
    own = params.get("quant")
    if own not in space.quant_bytes:
        return []
    names = [o.name for o in space.quant if o.name != own]
    if objective in SIZE_OBJECTIVES:
        names = sorted((n for n in names if space.quant_bytes[n] < space.quant_bytes[own]), key=space.quant_bytes.get)
    return [params | {"quant": name} for name in names]


# ---------------------------------------------------------------- the start: a ladder of students


def ladder(space: Space) -> list[str]:
    """The space's students from the largest to the smallest (by parameters; the teacher, where
    it is in the space, first): the rungs :func:`start_points` bisects."""
    return sorted(space.students, key=lambda s: (-space.student_params.get(s, 0), s))


def start_quant(space: Space) -> str:
    """The quantization the start's students are tried under: the one every engineer tries first
    (:data:`FIRST_QUANT`, what the teacher is tried under too), else the space's first option."""
    names = [o.name for o in space.quant]
    return first_untrained(names, ()) or names[0]


def rung_outcome(result: VariantResult | None, note: str, objective: str, best_val: float | None,
                 tolerance: float) -> str | None:
    """What one unpruned student's trial says of where the smallest student that holds lies:

    * ``"holds"``: it meets every limit (for best-quality, also within ``tolerance`` of
      ``best_val``, the best validation quality of the fitting trials): look at smaller ones;
    * ``"quality"``: it lost too much quality (the quality limit, the tie band, or the pruner
      stopped it, or its prefix in another trial, while it trained): look at larger ones;
    * ``"limit"``: it misses only size, latency, memory or energy (or the size floor rejected
      it): look at smaller ones;
    * None: nothing measured (a failed or interrupted trial)."""
    if note.startswith("size floor"):
        return "limit"
    if note.startswith("pruned:") or "stopped by the pruner" in note:  # or its prefix was, in another trial
        return "quality"
    if result is None or result.report is None or result.verdict is None:
        return None
    if not result.verdict.fits:
        return "quality" if any(m.limit == "max_quality_drop" for m in result.verdict.misses) else "limit"
    if objective == "best-quality" and best_val is not None and quality_val(result) < best_val - tolerance:
        return "quality"
    return "holds"


def start_points(space: Space, outcomes: dict[str, str], busy: set[str], count: int) -> list[str]:
    """The search's start: up to ``count`` students to try next, unpruned, a parallel bisection of
    :func:`ladder` for the smallest student that holds.

    ``outcomes`` (student -> :func:`rung_outcome`) narrows the rungs still open: below the smallest
    that holds or misses only a size-like limit, above the largest that lost quality. The picks are
    spread evenly over the open rungs not tried or ``busy`` (being trained), the middle one first
    (what a batch cut short for the time budget keeps). The teacher is never picked (its
    post-training trials measure it); the start ends when no rung is open, or results contradict
    (a larger student lost quality where a smaller one held): the sampler takes over."""
    rungs = ladder(space)
    lo, hi = 0, len(rungs) - 1
    for i, student in enumerate(rungs):
        outcome = outcomes.get(student)
        if outcome == "holds":
            lo = max(lo, i)
        elif outcome == "limit":
            lo = max(lo, i + 1)
        elif outcome == "quality":
            hi = min(hi, i - 1)
    open_ = [s for s in rungs[lo: hi + 1] if s != "teacher" and s not in outcomes and s not in busy]
    n = len(open_)
    picks = range(n) if count >= n else [(j + 1) * (n + 1) // (count + 1) - 1 for j in range(count)]
    centre = (n - 1) / 2
    return [open_[i] for i in sorted(picks, key=lambda i: (abs(i - centre), i))]


def quality_val(result: VariantResult) -> float:
    """A measured variant's validation quality (its test quality where it has none)."""
    return result.report.extra.get("quality_val", result.report.quality or 0.0)


def score(result: VariantResult, objective: str, tolerance: float = 0.005, teacher_bytes: int | None = None) -> float:
    """What a finished trial reports to the study (maximised): the objective's own figure. For
    best-quality, the selection's tie rule too: the validation quality (the test split only
    judges) in steps of ``tolerance``, and within a step the smaller the better, by up to 0.9 of a
    step (size as a share of the teacher's)."""
    r = result.report

    def quality() -> float:
        q = quality_val(result)
        if not tolerance or not teacher_bytes:
            return q
        return (q // tolerance) * tolerance + 0.9 * tolerance * (1.0 - min(1.0, r.size_bytes / teacher_bytes))

    return {"best-quality": quality, "smallest": lambda: -r.size_bytes / MB,
            "fastest": lambda: -r.latency_p50_ms, "lowest-energy": lambda: -r.energy_mj}[objective]()


def violation(result: VariantResult) -> float:
    """The summed excess over every broken limit (0.0: the variant fits): the trial's constraint."""
    return sum(m.excess for m in result.verdict.misses) if result.verdict else float("inf")


def front(results: list[VariantResult]) -> list[VariantResult]:
    """The Pareto front over (quality higher, size smaller, p50 lower) of the measured results."""
    pts = [r for r in results if r.report is not None]

    def dominates(a, b) -> bool:
        ka = (-(a.report.quality or 0.0), a.report.size_bytes, a.report.latency_p50_ms)
        kb = (-(b.report.quality or 0.0), b.report.size_bytes, b.report.latency_p50_ms)
        return all(x <= y for x, y in zip(ka, kb, strict=True)) and ka != kb

    return sorted((r for r in pts if not any(dominates(o, r) for o in pts)), key=lambda r: r.report.size_bytes)
