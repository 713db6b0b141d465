"""The search's clock: how long a batch of trials will take, learned from what ran."""

from __future__ import annotations

import pytest

from shrinkflow import steps
from shrinkflow.specs import DistillSpec, FinetuneSpec, PruneSpec, QuantSpec, Recipe, Report, VariantResult, Verdict


def _kd(width: float, depth: float = 1.0, epochs: int = 10, quant: str | None = None, runtime: str = "torch") -> Recipe:
    tail = (QuantSpec(scheme=quant),) if quant else ()
    return Recipe(name=f"kd-w{width}-d{depth}-e{epochs}-{quant}", runtime=runtime,
                  steps=(DistillSpec(width=width, depth=depth, epochs=epochs, samples_per_epoch=100), *tail))


def _record(recipe: Recipe, seconds: float) -> VariantResult:
    report = Report(quality=0.9, size_bytes=1, raw_size_bytes=1, params=1, nonzero_params=1, sparsity=0.0, macs=1,
                    latency_p50_ms=1.0, latency_p95_ms=1.0, peak_memory_bytes=1, energy_mj=1.0,
                    energy_source="estimated", threads=1, artifact_format="torch.export")
    return VariantResult(name=recipe.name, recipe=recipe, report=report, verdict=Verdict(fits=True), seconds=seconds)


def test_training_load_counts_prefix_tasks_draws_and_width_weighted_samples():
    kd = DistillSpec(width=0.5, depth=1.0, epochs=4, samples_per_epoch=100)
    prune = PruneSpec(method="l1-structured", ratio=0.3, finetune=FinetuneSpec(epochs=2, samples_per_epoch=50))
    recipe = Recipe(name="r", steps=(kd, prune, QuantSpec(scheme="int8-dynamic")))
    assert steps.training_load(recipe.steps, 1000) == (2, 4 * 100 + 2 * 50, 4 * 0.5 * 100 + 2 * 0.5 * 50)
    done = frozenset({steps.prefix_identity((kd,))})
    assert steps.training_load(recipe.steps, 1000, done) == (1, 2 * 50, 2 * 0.5 * 50)  # the distillation is cached
    assert steps.training_load((QuantSpec(scheme="int8-dynamic"),), 1000) == (0, 0.0, 0.0)
    assert steps.training_load(recipe.steps, 1000)[2] == steps.training_samples(recipe, 1000)


def test_the_clock_fits_training_to_the_prefixes_it_timed_so_small_students_are_not_counted_as_free():
    from flows.search import Clock

    def truth(recipe: Recipe) -> float:  # 0.5 s a task, 2 ms a sample drawn, 10 ms a width-weighted sample
        runs, draws, weighted = steps.training_load(recipe.steps, 10_000)
        return 0.5 * runs + 0.002 * draws + 0.01 * weighted

    clock = Clock(per_sample=0.01, workers=2, n_train=10_000)  # the teacher's rate: right for width 1 only
    tiny, wide = _kd(0.1, 0.5), _kd(1.0)
    assert clock.trial(tiny) == pytest.approx(0.01 * 0.05 * 1000)  # 0.5 s, where it takes 3.25 s
    prune = PruneSpec(method="l1-structured", ratio=0.3, finetune=FinetuneSpec(epochs=2, samples_per_epoch=50))
    first = [_kd(0.25), _kd(0.5, epochs=20)]
    pruned = Recipe(name="p", steps=(*first[0].steps, prune))
    clock.learn(first, True, 10.0, prefixes=[(r.steps, truth(r)) for r in first])
    # two distillations cannot tell a sample drawn from its width: each way fits them, the larger counts
    assert len(clock.fits) == 2 and clock.trial(tiny) >= truth(tiny) - 1e-9
    clock.learn([pruned], True, 10.0, prefixes=[(pruned.steps, truth(pruned) - truth(first[0]))])  # its own step
    [(task, draw, sample)] = clock.fits
    assert (task, draw, sample) == pytest.approx((0.5, 0.002, 0.01))
    assert clock.trial(tiny) == pytest.approx(truth(tiny)) and clock.trial(wide) == pytest.approx(truth(wide))
    assert clock.trial(first[0]) == 0.0  # its prefix is computed: it trains nothing, and no fixed part is known


def test_the_clock_times_each_quantization_on_its_own_records():
    from flows.search import Clock

    clock = Clock(per_sample=0.0, workers=2, n_train=10_000, overhead=1.0)
    int8, fp16 = _kd(0.5, quant="int8-static"), _kd(0.5, quant="fp16")
    clock.learn([int8, fp16], False, 3.0, [_record(int8, 5.0), _record(fp16, 0.4)])
    assert clock.overhead == 3.0  # an untrained batch of two on two workers: 3 s each
    assert clock.trial(int8) == 5.0  # its own records: more than the fixed part
    assert clock.trial(fp16) == 3.0  # never less than the fixed part
    other = _kd(0.25, quant="int8-static")
    clock.learn([other], False, 1.0, [_record(other, 7.0)])
    assert clock.trial(int8) == 6.0  # the median of its records, whatever the student


def test_a_search_that_measured_nothing_yet_runs_its_first_trial_whatever_its_estimate():
    import time

    from flows.search import Clock, _within_budget
    from tasks.search import Trial

    clock = Clock(per_sample=0.1, workers=2, n_train=10_000)
    trials = [Trial(number=i, recipe=_kd(w)) for i, w in enumerate((1.0, 0.5))]  # 100 s and 50 s
    start = time.perf_counter() - 5  # 5 s of a 60 s budget spent: neither fits in what is left
    kept, not_run = _within_budget(60, start, trials, [], clock)
    assert kept == [] and len(not_run) == 2
    kept, not_run = _within_budget(60, start, trials, [], clock, tried=False)
    assert [t.number for t in kept] == [0] and [t.number for t in not_run] == [1]
    assert not_run[0].note.startswith("not run: a batch takes about 100 s")


def test_a_quantization_not_timed_yet_counts_its_runtimes_own_part():
    from flows.search import Clock

    clock = Clock(per_sample=0.0, workers=2, n_train=10_000, overhead=1.0)
    xnn8 = _kd(0.5, quant="int8-dynamic-intx", runtime="executorch")
    xnn4 = _kd(0.5, quant="int4-dynamic-intx", runtime="executorch")
    torch8 = _kd(0.5, quant="int8-static")
    assert clock.trial(torch8) == 1.0  # nothing timed: the fixed part
    assert clock.trial(xnn4) == 3.0  # an ExecuTorch program, nothing of its runtime timed yet: 3x the fixed part
    clock.learn([xnn8, torch8], True, 20.0, [_record(xnn8, 15.0), _record(torch8, 4.0)])
    assert clock.trial(xnn4) == 15.0  # an ExecuTorch program, built and measured: as the one timed
    assert clock.trial(_kd(0.5, quant="fp16")) == 4.0  # torch's, never under the fixed part
    clock.learn([xnn4], True, 10.0, [_record(xnn4, 9.0)])
    assert clock.trial(xnn4) == 9.0  # its own records, once it has some


def test_the_first_batch_under_a_budget_collects_its_untrained_trials_apart():
    from flows.search import Clock, first_parts
    from tasks.search import Trial

    clock = Clock(per_sample=0.01, workers=2, n_train=10_000)
    int8 = Recipe(name="t000-int8", steps=(QuantSpec(scheme="int8-dynamic"),))
    batch = [Trial(number=0, recipe=int8), Trial(number=1, recipe=_kd(0.5)), Trial(number=2, recipe=_kd(0.25))]
    parts = first_parts(batch, clock)
    assert [[t.number for t in part] for part in parts] == [[0], [1, 2]]
    assert [[t.number for t in part] for part in first_parts(batch[1:], clock)] == [[1, 2]]  # all train: one
    assert [[t.number for t in part] for part in first_parts(batch[:1], clock)] == [[0]]


def test_under_a_time_budget_the_batch_that_ends_first_is_collected_first():
    import threading

    from flows.compress import Pending

    class Batch:  # a batch in flight: whether it has ended
        def __init__(self) -> None:
            self.ended = threading.Event()

        def done(self) -> bool:
            return self.ended.is_set()

    long, short = Batch(), Batch()
    flight = [long, short]
    threading.Timer(0.2, short.ended.set).start()
    assert Pending.first_ended(flight) == 1  # the later, shorter batch: not held behind the long one
    long.ended.set()
    assert Pending.first_ended(flight) == 0  # both ended: the first submitted
