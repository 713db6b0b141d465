"""The search's model-side half (shrinkflow.search, shrinkflow.sensitivity, shrinkflow.precision): layer
groups, the sensitivity pass and its cache, the space derived from a model and a budget, and how a
trial becomes a recipe. No servers."""

from __future__ import annotations

import collections

import optuna
import pytest
import torch
from torch import nn

from shrinkflow import budget, precision, search, sensitivity, steps
from shrinkflow.cache import DirCache
from shrinkflow.errors import SpecError
from shrinkflow.specs import (
    Budget,
    QuantSpec,
    Report,
    SearchSpec,
    SweepSpec,
    VariantResult,
    Verdict,
    parse,
)
from tests.unit import plugin_workload


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({"query": nn.Linear(8, 8), "key": nn.Linear(8, 8)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(8, 16)})


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict({"word_embeddings": nn.Embedding(50, 8)})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([Block(), Block()])})
        self.classifier = nn.Linear(8, 2)


def test_groups_follow_blocks_and_their_parts():
    groups = sensitivity.groups(TinyEncoder())
    assert groups == {"embeddings": ["embeddings.word_embeddings"],
                      "encoder.layer.0.attention": ["encoder.layer.0.attention.query", "encoder.layer.0.attention.key"],
                      "encoder.layer.0.intermediate": ["encoder.layer.0.intermediate.dense"],
                      "encoder.layer.1.attention": ["encoder.layer.1.attention.query", "encoder.layer.1.attention.key"],
                      "encoder.layer.1.intermediate": ["encoder.layer.1.intermediate.dense"],
                      "classifier": ["classifier"]}
    cnn = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(4, 4, 3)), nn.Flatten())
    assert sensitivity.groups(cnn) == {"0": ["0.0"], "1": ["1.0"]}


def _sens(drops: dict[str, float], scheme: str = "int8-static") -> sensitivity.Sensitivity:
    return sensitivity.Sensitivity(baseline=0.9, groups=tuple(sensitivity.GroupDrop(group=g, params=10, drops={scheme: d})
                                                         for g, d in drops.items()))


def test_the_most_sensitive_groups_stay_in_float_until_the_rest_fits_the_allowance():
    sens = _sens({"stem": 0.004, "mid": 0.0005, "head": 0.02, "tail": -0.001})
    assert precision.kept_float(sens, "int8-static", 0.005) == ("head",)  # 0.0245 -> 0.0045 once head is float
    assert precision.kept_float(sens, "int8-static", 0.001) == ("head", "stem")
    assert precision.kept_float(sens, "int8-static", 0.1) == ()
    # the low precision goes to the cheapest first: the least drop per parameter (a gain counts as none)
    model = nn.Sequential(collections.OrderedDict((g, nn.Linear(8, 8)) for g in ("stem", "mid", "head", "tail")))
    assert [u for u, _ in precision.low_bit_units(sens, "int8-static", model)] == [("tail",), ("mid",), ("stem",), ("head",)]


@pytest.fixture(scope="module")
def plugin_ctx(tmp_path_factory):
    wl = plugin_workload.make()
    return steps.context(wl, DirCache(tmp_path_factory.mktemp("cache")), 0)


def test_sensitivity_is_measured_once_and_cached(plugin_ctx, monkeypatch):
    options = sensitivity.quant_options(plugin_ctx.workload.teacher, ("torch",))
    first = sensitivity.sensitivity(plugin_ctx, options)
    assert {g.group for g in first.groups} == {"0", "2"}
    assert all("int8-dynamic" in g.drops and "fp16" in g.drops for g in first.groups)
    assert set(first.prune) == {"magnitude-global", "l1-structured"} and first.seconds > 0
    monkeypatch.setattr(steps.STEPS["quantize"], "apply", lambda *a: pytest.fail("recomputed a cached sensitivity"))
    assert sensitivity.sensitivity(plugin_ctx, options) == first


def test_space_follows_the_device_runtimes_and_the_size_limit(plugin_ctx):
    mcu, limits = budget.resolve("mcu-nrf52840", None)
    options = sensitivity.quant_options(plugin_ctx.workload.teacher, mcu.runtimes)
    assert {o.runtime for o in options} == {"torch"}  # no XNNPACK program for a Cortex-M4
    space = search.derive(plugin_ctx, mcu, limits, sensitivity.sensitivity(plugin_ctx, options), options, SearchSpec())
    assert "teacher" in space.students and len(space.students) > 1
    phone, _ = budget.resolve("phone", None)
    options = sensitivity.quant_options(plugin_ctx.workload.teacher, phone.runtimes)
    assert {"xnn-int8", "xnn-fp32"} <= {o.name for o in options}
    measured = sensitivity.sensitivity(plugin_ctx, options)
    # Magnitude pruning that loses everything is left out: then the teacher's 323 parameters cannot
    # come under 50 bytes (int4 at best, halved for entropy coding), while narrow students can.
    sens = measured.model_copy(update={"prune": {"magnitude-global": {"0.5": 0.9}}})
    space = search.derive(plugin_ctx, phone, Budget(max_size_mb=0.000_05, max_quality_drop=1.0), sens, options, SearchSpec())
    assert "teacher" not in space.students and "teacher" in space.why and "magnitude-global" in space.why
    assert space.students and all(search._student_shape(s)[0] <= 0.35 for s in space.students)


def test_a_trial_becomes_a_recipe_and_the_same_seed_gives_the_same_trials(plugin_ctx):
    profile, limits = budget.resolve("phone", None)
    options = sensitivity.quant_options(plugin_ctx.workload.teacher, profile.runtimes)
    space = search.derive(plugin_ctx, profile, limits, sensitivity.sensitivity(plugin_ctx, options), options, SearchSpec())

    def names(seed: int) -> list[str]:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        out = []
        for _ in range(12):
            recipe = search.suggest(study.ask(), space)
            out.append(recipe.name if recipe else "teacher")
        return out

    first = names(3)
    assert first == names(3) and first != names(4)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    recipes = [r for r in (search.suggest(study.ask(), space) for _ in range(30)) if r is not None]
    kinds = {s.kind for r in recipes for s in r.steps}
    assert {"distill", "prune", "quantize"} <= kinds
    assert {r.runtime for r in recipes} == {"torch", "executorch"}
    xnn = [s for r in recipes if r.runtime == "executorch" for s in r.steps if s.kind == "quantize"]
    assert xnn and all(s.scheme.endswith("-intx") for s in xnn)  # what the XNNPACK delegate lowers


def _result(name: str, quality: float, size: int, p50: float, fits: bool = True) -> VariantResult:
    report = Report(quality=quality, size_bytes=size, raw_size_bytes=size, params=1, nonzero_params=1, sparsity=0.0,
                    macs=1, latency_p50_ms=p50, latency_p95_ms=p50, peak_memory_bytes=1, energy_mj=1.0,
                    energy_source="estimated", threads=1, artifact_format="torch.export")
    return VariantResult(name=name, report=report, verdict=Verdict(fits=fits))


def test_front_score_and_violation():
    a, b, c = _result("a", 0.9, 1000, 1.0), _result("b", 0.95, 2000, 1.0), _result("c", 0.89, 3000, 2.0)
    assert [r.name for r in search.front([a, b, c])] == ["a", "b"]  # c is worse than a on every axis
    assert search.score(b, "best-quality") == 0.95 and search.score(b, "smallest") == -0.002
    assert search.violation(a) == 0.0


@pytest.mark.parametrize(("data", "field"), [
    ({"search": {"trials": 0}}, "search.trials"),
    ({"search": {"minutes": -1}}, "search.minutes"),
    ({"search": {"sampler": "grid"}}, "search.sampler"),
    ({"objective": "cheapest"}, "objective"),
    ({"workload_recipes": True, "search": {"trials": 4}}, "<root>"),
])
def test_bad_search_input_names_the_field(data, field):
    with pytest.raises(SpecError, match=f"'{field}'"):
        parse(SweepSpec, data)


def test_no_recipes_means_a_search_and_recipes_with_a_search_seed_it():
    assert parse(SweepSpec, {}).searching
    recipes = [{"name": "q", "steps": [{"kind": "quantize"}]}]
    assert not parse(SweepSpec, {"recipes": recipes}).searching
    assert parse(SweepSpec, {"recipes": recipes, "search": {"trials": 4}}).searching
    assert not parse(SweepSpec, {"recipes": recipes, "search": {}}).searching  # an untouched form section
    assert not parse(SweepSpec, {"workload_recipes": True}).searching
    assert parse(SweepSpec, {"recipes": [], "search": {}}).searching
    # the Prefect UI's form sends an untouched section with its defaults filled in: recipes only
    untouched = {"trials": 16, "minutes": None, "parallel": None, "sampler": "tpe", "prune_trials": True, "runtime": None}
    assert not parse(SweepSpec, {"recipes": recipes, "search": untouched}).searching
    assert parse(SweepSpec, {"recipes": recipes, "search": untouched | {"minutes": 5}}).searching


def test_training_scores_reach_the_monitor_with_their_step(plugin_ctx):
    seen = []
    token = steps.MONITOR.set(lambda step, score: seen.append((step.index, step.kind, step.epochs)))
    try:
        from shrinkflow.specs import DistillSpec

        steps.materialize(plugin_ctx, [DistillSpec(width=0.5, epochs=2, patience=5)])
    finally:
        steps.MONITOR.reset(token)
    assert set(seen) == {(0, "distill", 2)} and len(seen) == 3  # before training, then after each epoch


def test_the_median_rule_judges_against_trials_told_before_the_batch_only():
    """A batch runs while the one before it is told: the trials told meanwhile (numbers 2 and 3 here)
    must not change what stops a trial of the batch, or the search would depend on timing."""
    from optuna.trial import TrialState, create_trial

    from tasks.search import PrunerSpec

    study = optuna.create_study(direction="maximize")
    for value in (0.9, 0.8, 0.2, 0.1):  # trials 0-1 told before the batch; 2-3 while it ran
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, intermediate_values={5: value}))
    judged = create_trial(state=TrialState.COMPLETE, value=0.5, intermediate_values={3: 0.4, 5: 0.5})
    assert PrunerSpec(kind="percentile", n_startup=2, before=2).build().prune(study, judged)  # 0.5 < median(0.9, 0.8)
    assert not PrunerSpec(kind="percentile", n_startup=2).build().prune(study, judged)  # all four: median 0.5
    assert not PrunerSpec(kind="percentile", n_startup=3, before=2).build().prune(study, judged)  # too few before it
    early = create_trial(state=TrialState.COMPLETE, value=0.5, intermediate_values={4: 0.1})
    assert not PrunerSpec(kind="percentile", n_startup=2, before=2).build().prune(study, early)  # nothing at step 4


def test_the_size_floor_counts_4_bits_only_for_layers_of_whole_int4_groups():
    from torch import nn

    model = nn.Sequential(nn.Linear(6, 64, bias=False), nn.Linear(64, 10, bias=False))  # 384 and 640 weights
    assert search._bytes_per_param(model, 0.5) == pytest.approx((384 * 1.0 + 640 * 0.5) / 1024)
    assert search._bytes_per_param(model, 1.0) == 1.0


def test_a_transformer_without_a_student_factory_gets_students_made_of_its_layers(tmp_path):
    """No make_student: the search's students keep some of the teacher's own layers (init: parent),
    and every transformer student learns hidden states and attention relations too."""
    wl = plugin_workload.bert_pair(0)
    wl.make_student = None
    ctx = steps.context(wl, DirCache(tmp_path), 0)
    profile, limits = budget.resolve("phone", None)
    options = sensitivity.quant_options(wl.teacher, ("torch",))
    space = search.derive(ctx, profile, limits, sensitivity.sensitivity(ctx, options), options, SearchSpec())
    assert space.distill_init == "parent" and space.layerwise
    assert [s for s in space.students if s != "teacher"] == ["w100-d67"]  # 2 layers: one shallower student
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kd = next(s for r in (search.suggest(study.ask(), space) for _ in range(30)) if r is not None
              for s in r.steps if s.kind == "distill")
    assert (kd.init, kd.width, kd.hidden, kd.relations) == ("parent", 1.0, 1.0, 1.0)


def test_a_time_budget_starts_no_batch_that_would_end_past_it():
    """``search.minutes`` is a budget, not just a start deadline: the batches so far say how long
    the next would take, and it is not started if it would end past the budget."""
    from flows.search import over_budget

    assert over_budget(600, 10, []) is None  # nothing measured yet: the first batch starts
    assert over_budget(600, 400, [150, 120, 180]) is None  # 400 + 150 < 600
    assert over_budget(600, 451, [150, 120, 180]) == "a batch takes about 150 s and 149 s are left of the 10-minute budget"
    assert "spent" in over_budget(600, 600, [])
    # A search that has tried nothing (the sensitivity pass ate the budget) still runs a trial.
    assert over_budget(600, 700, [], tried=False) is None
    assert "spent" in over_budget(600, 700, [300], tried=True)


def test_pruning_that_leaves_a_recurrent_model_unchanged_is_left_out_of_the_space(tmp_path):
    """A GRU with a small Linear head: magnitude and channel pruning act on the head alone (about 1%
    of the parameters), so the probes refuse both and no trial trains a fine-tune for nothing."""
    from torch.utils.data import TensorDataset

    from shrinkflow.workloads import Workload, accuracy

    class Gru(nn.Module):
        def __init__(self, width: float = 1.0, depth: float = 1.0) -> None:
            super().__init__()
            self.gru = nn.GRU(6, max(4, int(48 * width)), batch_first=True)
            self.head = nn.Linear(max(4, int(48 * width)), 3)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 5, 6, generator=g), torch.randint(0, 3, (90,), generator=g)
    split = TensorDataset(x[:30], y[:30])
    wl = Workload(name="gru", teacher=Gru().eval(), train=split, val=TensorDataset(x[30:60], y[30:60]),
                  test=TensorDataset(x[60:], y[60:]), quality=accuracy, make_student=Gru)
    ctx = steps.context(wl, DirCache(tmp_path), 0)
    profile, limits = budget.resolve("rpi4", None)
    options = sensitivity.quant_options(wl.teacher, ("torch",))
    measured = sensitivity.sensitivity(ctx, options)
    for method in ("magnitude-global", "l1-structured"):
        assert "the layers it prunes hold too little of this model (rnn 98%, linear 2%)" in measured.refused[method]
        assert measured.prune[method] == {}
    space = search.derive(ctx, profile, limits, measured, options, SearchSpec())
    assert space.prune_methods == ("none",) and "too little" in space.why["l1-structured"]
    # the digits-like MLP of the plugin workload is pruned as before
    plugin = steps.context(plugin_workload.make(0), DirCache(tmp_path / "mlp"), 0)
    assert not sensitivity.sensitivity(plugin, sensitivity.quant_options(plugin.workload.teacher, ("torch",))).refused


def test_a_study_of_another_space_or_teacher_is_kept_and_not_resumed(tmp_path, monkeypatch):
    """The same spec run again after its teacher was retrained (or its space changed) must not
    resume trials drawn for the old one: Optuna refuses a categorical whose choices changed, and
    the old trials' results are another model's."""
    from tasks import search as engine

    monkeypatch.setenv("SHRINKFLOW_SEARCH_STORAGE", f"sqlite:///{tmp_path / 'search.db'}")
    spec = parse(SweepSpec, {"workload": "tests.unit.plugin_workload:make", "device": "rpi4", "name": "s"})
    pruner = engine.PrunerSpec(kind="none")
    space = search.Space(students=("teacher", "w50-d100"), prune_methods=("none", "l1-structured"))
    old = engine.space_identity(space, "teacher-a")
    study = engine.open_study(spec, pruner, old)
    assert study.study_name == engine.study_name(spec)
    trial = study.ask()
    trial.suggest_categorical("prune", list(space.prune_methods))
    study.tell(trial, 0.5)
    assert engine.open_study(spec, pruner, old).study_name == engine.study_name(spec)  # the same: resumed
    assert len(engine.open_study(spec, pruner, old).get_trials()) == 1
    narrower = engine.space_identity(space.model_copy(update={"prune_methods": ("none",)}), "teacher-a")
    retrained = engine.space_identity(space, "teacher-b")
    assert len({old, narrower, retrained}) == 3
    for identity in (narrower, retrained):
        other = engine.open_study(spec, pruner, identity)
        assert other.study_name == f"{engine.study_name(spec)}-{identity[:8]}" and not other.get_trials()
        asked = other.ask()
        assert asked.suggest_categorical("prune", ["none"]) == "none"  # no clash with the old study's choices
        other.tell(asked, 0.4)
        assert engine.open_study(spec, pruner, identity).study_name == other.study_name  # resumed on the next run
    assert len(engine.open_study(spec, pruner, old).get_trials()) == 1  # the old study is as it was
    assert engine.space_identity(space.model_copy(update={"why": {"x": "y"}}), "teacher-a") == old  # notes aside


def test_the_sensitivity_pass_scores_probes_on_a_spread_sample_of_a_large_validation_split():
    from torch.utils.data import TensorDataset

    wl = plugin_workload.make(0)
    seen = []
    wl.quality = lambda model, split: seen.append(split) or 0.5
    n = len(wl.val)
    sensitivity.probe_scorer(wl)(nn.Linear(1, 1))
    assert seen[-1] is wl.val and n <= sensitivity.SENSITIVITY_SAMPLES  # small splits: all of it
    x = torch.arange(3 * sensitivity.SENSITIVITY_SAMPLES).unsqueeze(1)
    wl.val = TensorDataset(x, x.squeeze(1))
    sensitivity.probe_scorer(wl)(nn.Linear(1, 1))
    kept = seen[-1].tensors[0].squeeze(1)
    assert len(kept) == sensitivity.SENSITIVITY_SAMPLES and kept[0] == 0 and kept[-1] >= 2 * sensitivity.SENSITIVITY_SAMPLES


def test_a_factory_that_only_drops_layers_gets_depth_students_and_a_large_split_short_epochs(tmp_path):
    """MiniLM's factory keeps the teacher's width and refuses narrower students: the search must not
    fail on the shapes it refuses (it did: `shrinkflow run --workload minilm --device phone-entry`
    stopped in the search-space task), but search the depths it builds. On a split larger than
    LARGE_SPLIT, a trial's training draws bounded epochs, gently, from the teacher's own layers."""
    import torch
    from torch.utils.data import TensorDataset

    from shrinkflow.layerwise import shallower

    wl = plugin_workload.bert_pair(0)
    teacher = wl.teacher

    def layers_only(width: float, depth: float):
        if width != 1.0:
            raise SpecError(f"DistillSpec.width={width!r}: expected 1.0")
        return shallower(teacher, depth)

    wl.make_student = layers_only
    repeats = search.LARGE_SPLIT // len(wl.train) + 1
    wl.train = TensorDataset(*(t.repeat(repeats, *([1] * (t.dim() - 1))) for t in wl.train.tensors))
    assert len(wl.train) > search.LARGE_SPLIT and torch.equal(wl.train.tensors[0][:4], plugin_workload.bert_pair(0).train.tensors[0][:4])
    ctx = steps.context(wl, DirCache(tmp_path), 0)
    profile, limits = budget.resolve("phone", None)
    options = sensitivity.quant_options(wl.teacher, ("torch",))
    space = search.derive(ctx, profile, limits, sensitivity.sensitivity(ctx, options), options, SearchSpec())
    assert [s for s in space.students if s != "teacher"] == ["w100-d67"]  # 2 layers: one shallower student
    assert "refused 10 of 10 shapes" in space.why["student shapes"] and "expected 1.0" in space.why["student shapes"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    recipes = [r for r in (search.suggest(study.ask(), space) for _ in range(40)) if r is not None]
    kd = next(s for r in recipes for s in r.steps if s.kind == "distill")
    assert (kd.width, kd.depth, kd.samples_per_epoch, kd.epochs) == (1.0, 0.67, search.LARGE_SPLIT, search.LARGE_DISTILL_EPOCHS)
    assert (kd.lr, kd.scheduler) == (3e-4, "cosine")
    prune = next((s for r in recipes for s in r.steps if s.kind == "prune"), None)
    if prune is not None:
        assert (prune.finetune.epochs, prune.finetune.samples_per_epoch) == (search.LARGE_FINETUNE_EPOCHS, search.LARGE_SPLIT // 2)
    # a small split keeps the whole-split epochs and the default schedule
    small = search.derive(steps.context(plugin_workload.bert_pair(0), DirCache(tmp_path), 0), profile, limits,
                          sensitivity.sensitivity(ctx, options), options, SearchSpec())
    assert small.samples_per_epoch is None and small.distill_epochs == search.DISTILL_EPOCHS and small.distill_schedule == {}


def test_the_size_estimate_counts_bits_scales_and_the_layers_int4_leaves_at_int8():
    from torch import nn

    from shrinkflow.quantize import estimated_bytes
    from shrinkflow.specs import QuantSpec

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8), nn.Linear(40, 8, bias=False))
    mixed = QuantSpec(scheme="int4-dynamic-intx", include=("0", "2"))
    # layer 0: 2048 int4 weights + a byte of scale per 32; layer 1 (not included): int8 + a 4-byte scale
    # per row of 32; layer 2: 40 inputs are not whole groups of 32, so int8 too; biases in fp32.
    assert estimated_bytes(model, (mixed,)) == int(2048 * (0.5 + 1 / 32) + 256 * (1 + 4 / 32) + 320 * (1 + 4 / 40)
                                                   + (32 + 8) * 4)
    assert estimated_bytes(model, ()) == sum(p.numel() for p in model.parameters()) * 4
    kept = QuantSpec(scheme="int4-dynamic-intx", include=("0",), keep_float=("1",))
    assert estimated_bytes(model, (kept,)) == int(2048 * (0.5 + 1 / 32) + 256 * 4 + 320 * (1 + 4 / 40) + 40 * 4)


def test_a_teacher_that_does_not_fit_gets_low_bits_on_its_least_sensitive_groups_until_it_fits():
    """The effective-bits rule: the low-bit option that the quality tolerance shaped (one group at
    int4) is extended, least sensitive group first, until the teacher's estimate fits the limit."""
    from torch import nn

    from shrinkflow.quantize import estimated_bytes

    model = nn.Sequential(*(nn.Sequential(nn.Linear(64, 64, bias=False)) for _ in range(4)))
    drops = {"0": 0.004, "1": 0.001, "2": 0.003, "3": 0.002}
    sens = sensitivity.Sensitivity(baseline=1.0, groups=tuple(sensitivity.GroupDrop(group=g, params=4096, drops={"int4-dynamic-intx": d})
                                                         for g, d in drops.items()))
    option = sensitivity.QuantOption(name="xnn-int4", runtime="executorch", probe="int8-dynamic-intx",
                                low_bits="int4-dynamic-intx", steps=(QuantSpec(scheme="int4-dynamic-intx"),))
    shaped = precision.with_groups(option, sens, model, 0.002)  # groups within 0.001 of drop: "1" only
    assert shaped.steps[0].include == ("1.0",)
    int4, int8 = 4096 * (0.5 + 1 / 32), 4096 * (1 + 4 / 64)
    fit, why = precision.fit_low_bits(shaped, sens, model, 2 * int4 + 2 * int8)  # room for two int4 layers
    assert why == "" and fit.name == "xnn-int4-fit" and fit.steps[0].include == ("1.0", "3.0")
    assert estimated_bytes(model, fit.steps) <= 2 * int4 + 2 * int8
    assert precision.fit_low_bits(shaped, sens, model, 4 * int8) == (None, "")  # fits already: nothing to add
    none, why = precision.fit_low_bits(shaped, sens, model, 3 * int4)
    assert none is None and "even with every measured group in int4-dynamic-intx" in why


def test_training_samples_weigh_epochs_by_width_and_skip_computed_prefixes():
    from shrinkflow.specs import DistillSpec, FinetuneSpec, PruneSpec, QuantSpec, Recipe

    kd = DistillSpec(width=0.5, depth=1.0, epochs=4, samples_per_epoch=100)
    prune = PruneSpec(method="l1-structured", ratio=0.3, finetune=FinetuneSpec(epochs=2, samples_per_epoch=50))
    recipe = Recipe(name="r", steps=(kd, prune, QuantSpec(scheme="int8-dynamic")))
    assert steps.training_samples(recipe, 1000) == 4 * 0.5 * 100 + 2 * 0.5 * 50
    done = frozenset({steps.prefix_identity((kd,))})
    assert steps.training_samples(recipe, 1000, done) == 2 * 0.5 * 50  # the distillation is in the prefix cache
    assert steps.training_samples(Recipe(name="q", steps=(QuantSpec(scheme="int8-dynamic"),)), 1000) == 0
    assert steps.training_samples(Recipe(name="k", steps=(kd.model_copy(update={"samples_per_epoch": None}),)), 30) == 4 * 0.5 * 30


def test_the_clock_trims_a_batch_to_what_the_budget_holds_and_learns_from_measured_batches(plugin_ctx):
    import time

    from flows.search import Clock, _within_budget
    from shrinkflow.specs import DistillSpec, QuantSpec, Recipe
    from tasks.search import Trial

    assert search.train_seconds_per_sample(plugin_ctx) > 0
    kd = [Recipe(name=f"kd{i}", steps=(DistillSpec(width=1.0, depth=1.0, epochs=10, samples_per_epoch=100, lr=1e-3 * (i + 1)),))
          for i in range(3)]  # 1,000 sample passes each
    clock = Clock(per_sample=0.1, workers=2, n_train=10_000)
    ptq = [Recipe(name="q", steps=(QuantSpec(scheme="int8-dynamic"),))] * 2
    assert not clock.trains(ptq) and clock.trains(kd)
    clock.learn(ptq, False, 30.0)  # two untrained trials on two workers: 30 s each
    assert clock.overhead == 30.0
    assert clock.batch(kd[:1]) == pytest.approx(30 + 100)  # overhead + 1,000 x 0.1 s
    assert clock.batch(kd[:2]) == pytest.approx(130)  # two workers: side by side
    assert clock.batch(kd) == pytest.approx(3 * 130 / 2)
    clock.learn(kd[:2], True, 260.0)  # measured twice the estimate
    assert clock.batch(kd[2:]) == pytest.approx(260) and not clock.trains(kd[:2])  # its prefixes are computed now

    trials = [Trial(number=i, recipe=r) for i, r in enumerate(kd)]
    fresh = Clock(per_sample=0.1, workers=2, n_train=10_000, overhead=30.0)
    start = time.perf_counter() - 100  # 100 s of a 280 s budget spent
    kept, not_run = _within_budget(280, start, trials, [], fresh)
    assert [t.number for t in kept] == [0, 1] and [t.number for t in not_run] == [2]  # 195 s would not end in time
    assert not_run[0].state == "FAIL" and not_run[0].note.startswith("not run: a batch takes about 195 s")
    in_flight = [([], None, time.perf_counter(), 60.0, True)]  # a batch ahead needs 60 s more: 290 s > 280 s
    kept, not_run = _within_budget(280, start, trials, in_flight, fresh)
    assert kept == [] and [t.number for t in not_run] == [0, 1, 2] and "about 130 s" in not_run[0].note


def test_a_new_study_starts_with_an_untrained_option_the_teacher_can_fit():
    from tasks.search import enqueue_untrained

    quant = tuple(sensitivity.QuantOption(name=n, runtime="executorch" if n.startswith("xnn") else "torch",
                                     steps=(QuantSpec(scheme="fp16"),))
                  for n in ("int8", "fp16", "xnn-int4", "xnn-int4-fit", "xnn-int4-fit-band50", "xnn-int4-fit-band100"))

    def enqueued(fits: tuple[str, ...], students=("teacher", "w25-d100")) -> list:
        study = optuna.create_study(direction="maximize")
        names = enqueue_untrained(study, search.Space(students=students, quant=quant, teacher_fits=fits))
        asked = [study.ask().suggest_categorical("quant", [o.name for o in quant]) for _ in names]
        assert asked == names  # the first trials asked are the enqueued ones, in order
        assert enqueue_untrained(study, search.Space(students=students, quant=quant, teacher_fits=fits)) == []  # not twice
        return names

    assert enqueued(("xnn-int4-fit",)) == ["xnn-int4-fit"]  # int8 cannot fit: not tried
    # with its band siblings, all at once: the smallest that measures within the tolerance ships
    bands = ("xnn-int4-fit-band50", "xnn-int4-fit-band100")
    assert enqueued(("xnn-int4-fit", *bands)) == ["xnn-int4-fit", *bands]
    # the quality-shaped option within the estimate's slack first, then its -fit and bands
    assert enqueued(("xnn-int4", "xnn-int4-fit", *bands)) == ["xnn-int4", "xnn-int4-fit", *bands]
    assert enqueued(("fp16", "int8")) == ["int8"]  # int8 when it fits
    assert enqueued(()) == ["int8"]  # nothing fits: the reference point all the same
    assert enqueued(("int8",), students=("w25-d100",)) == []  # the teacher's shape is out of the space


def test_the_training_rate_probe_copes_with_a_split_too_small_for_batch_norm(tmp_path):
    """One training sample: BatchNorm cannot train on a batch of one, so the rate is 0 (the clock
    then starts from the untrained trial's time), not an error in the search-space task."""
    from torch.utils.data import TensorDataset

    wl = plugin_workload.make()
    wl.teacher = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    wl.train = TensorDataset(*(t[:1] for t in wl.train.tensors))
    assert search.train_seconds_per_sample(steps.context(wl, DirCache(tmp_path), 0)) == 0.0


def test_int4_is_probed_layer_by_layer_over_int8_everywhere(tmp_path):
    """Per-layer mixed precision: each Linear layer alone in int4, the rest of the model in int8,
    scored against int8 everywhere on the layer-probe sample; a group's int4 drop is the sum of its
    layers'. With a tie tolerance, the option the teacher fits under gets a -band sibling."""
    import copy

    from shrinkflow.specs import QuantSpec

    wl = plugin_workload.bert_pair(0)
    teacher = wl.teacher

    def fidelity(model, split):  # how close the logits stay to the float teacher's: every quantization costs some
        ids, mask = split.tensors[0], split.tensors[1]
        with torch.no_grad():
            return -float((model(ids, mask) - teacher(ids, mask)).pow(2).mean())

    wl.quality = fidelity
    ctx = steps.context(wl, DirCache(tmp_path), 0)
    options = sensitivity.quant_options(teacher, ("executorch",))
    sens = sensitivity.sensitivity(ctx, options)
    linears = [n for n, m in teacher.named_modules() if isinstance(m, nn.Linear)]  # all 32 or 64 inputs wide
    assert list(sens.layers["int4-dynamic-intx"]) == linears
    assert list(sens.layers["int4-weight-only"]) == [n for n, m in teacher.named_modules() if isinstance(m, nn.Embedding)]
    score = sensitivity.probe_scorer(ctx.workload, sensitivity.LAYER_PROBE_SAMPLES)
    quantize = steps.STEPS["quantize"].apply
    int8 = score(quantize(ctx, copy.deepcopy(teacher), QuantSpec(scheme="int8-dynamic-intx")))
    assert int8 < score(teacher)  # the reference itself loses: a drop against the float teacher would differ
    for name in (linears[0], linears[-1]):
        alone = score(quantize(ctx, copy.deepcopy(teacher), QuantSpec(scheme="int4-dynamic-intx", include=(name,))))
        assert alone < int8 and sens.layers["int4-dynamic-intx"][name] == pytest.approx(int8 - alone)
    by_group = sensitivity.groups(teacher)
    for g in sens.groups:
        if "int4-dynamic-intx" in g.drops:
            assert g.drops["int4-dynamic-intx"] == pytest.approx(sum(sens.layers["int4-dynamic-intx"].get(n, 0.0)
                                                                      for n in by_group[g.group]))
    # With 0.004 per layer, a 2-point drop allowance (a quarter of it for the low bits) takes one
    # layer, and a tolerance of 0.02 two more at its half rung (within 0.01), five at its full one. The size limit is the teacher's estimate
    # under that option: int8 does not fit it, so the teacher is tried first in int4, and its band beside.
    from shrinkflow.budget import MB
    from shrinkflow.quantize import estimated_bytes

    profile, limits = budget.resolve("phone", Budget(max_quality_drop=0.02))
    tables = dict.fromkeys(sens.layers["int4-weight-only"], 0.0)  # the embedding tables lose nothing: all in int4 rows
    costly = sens.model_copy(update={"layers": {"int4-dynamic-intx": dict.fromkeys(linears, 0.004),
                                                "int4-weight-only": tables}})
    plain = search.derive(ctx, profile, limits, costly, options, SearchSpec())
    shaped = {o.name: estimated_bytes(teacher, o.steps) / MB for o in plain.quant}
    assert shaped["xnn-int8"] > 1.05 * shaped["xnn-int4"]  # int4 embeddings
    limits = limits.model_copy(update={"max_size_mb": shaped["xnn-int4"]})
    banded = search.derive(ctx, profile, limits, costly, options, SearchSpec(), tolerance=0.02)
    half, full = (next(o for o in banded.quant if o.name == f"xnn-int4-band{r}") for r in (50, 100))
    base = next(o for o in banded.quant if o.name == "xnn-int4")
    assert search.first_untrained([o.name for o in banded.quant], banded.teacher_fits) == "xnn-int4"
    assert len(base.steps[0].include) == 1 and {half.name, full.name} <= set(banded.teacher_fits)
    assert set(base.steps[0].include) < set(half.steps[0].include) < set(full.steps[0].include)
    assert (len(half.steps[0].include), len(full.steps[0].include)) == (3, 6)
    assert not any(o.name.endswith("-band") for o in plain.quant)


def test_low_bits_go_to_the_cheapest_layers_per_byte_and_the_band_adds_within_its_allowance():
    from shrinkflow.quantize import estimated_bytes

    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 256, bias=False),
                          nn.Linear(256, 64, bias=False), nn.Linear(64, 64, bias=False))
    # per weight: "3" loses least, then "1" (four times the weights of "0", twice its drop), "0", "2"
    drops = {"0": 0.001, "1": 0.002, "2": 0.008, "3": 0.0004}
    sens = sensitivity.Sensitivity(baseline=1.0, groups=(), layers={"int4-dynamic-intx": drops})
    assert [u for u, _ in precision.low_bit_units(sens, "int4-dynamic-intx", model)] == [("3",), ("1",), ("0",), ("2",)]
    option = sensitivity.QuantOption(name="xnn-int4", runtime="executorch", probe="int8-dynamic-intx",
                                low_bits="int4-dynamic-intx", steps=(QuantSpec(scheme="int4-dynamic-intx"),))
    shaped = precision.with_groups(option, sens, model, 0.002)  # within 0.001: "3" only ("1" would make 0.0024)
    assert shaped.steps[0].include == ("3",)
    with_1 = (shaped.steps[0].model_copy(update={"include": ("3", "1")}),)
    fit, why = precision.fit_low_bits(shaped, sens, model, estimated_bytes(model, with_1))
    assert why == "" and fit.steps[0].include == ("3", "1")
    # tolerance 0.003: the half rung (0.0015) takes "0" (0.001), not "2" (0.008 more); the full rung
    # takes the same layers, so it is left out
    [band] = precision.band_low_bits(fit, sens, model, 0.003)
    assert band.name == "xnn-int4-fit-band50" and band.steps[0].include == ("3", "1", "0")
    [band] = precision.band_low_bits(fit, sens, model, 0.001)  # the half rung takes nothing
    assert band.name == "xnn-int4-fit-band100" and band.steps[0].include == ("3", "1", "0")
    assert precision.band_low_bits(fit, sens, model, 0.0009) == []
    none, why = precision.fit_low_bits(shaped, sens, model, 100)
    assert none is None and "every measured layer in int4-dynamic-intx" in why


def test_the_first_untrained_option_and_the_layer_probes_sample():
    from torch.utils.data import TensorDataset

    first = search.first_untrained
    names = ["fp32", "xnn-int8", "xnn-int4", "xnn-int4-fit"]
    assert first(names, ("xnn-int8", "xnn-int4")) == "xnn-int8"  # int8 when it fits
    # within the estimate's 5% slack the quality-shaped option comes before its -fit sibling
    assert first(names, ("xnn-int4", "xnn-int4-fit")) == "xnn-int4"
    assert first(names, ("xnn-int4-fit",)) == "xnn-int4-fit"
    assert first(names, ()) == "xnn-int8" and first(["fp32"], ()) is None
    # a split over SENSITIVITY_SAMPLES: the layer probes score a spread sample of LAYER_PROBE_SAMPLES
    wl = plugin_workload.make(0)
    seen = []
    wl.quality = lambda model, split: seen.append(split) or 0.5
    x = torch.arange(3 * sensitivity.SENSITIVITY_SAMPLES).unsqueeze(1)
    wl.val = TensorDataset(x, x.squeeze(1))
    sensitivity.probe_scorer(wl, sensitivity.LAYER_PROBE_SAMPLES)(nn.Linear(1, 1))
    kept = seen[-1].tensors[0].squeeze(1)
    assert len(kept) <= sensitivity.LAYER_PROBE_SAMPLES and kept[0] == 0 and kept[-1] >= 2 * sensitivity.SENSITIVITY_SAMPLES


def test_embedding_tables_take_int4_rows_by_the_same_cost_per_byte_and_the_rest_int8_rows():
    """A big vocabulary table loses little per byte in int4 rows; a small table every token reads
    (positions, token types) can lose more per byte than whole Linear layers: it stays in float.
    Bytes saved: 3.5 per weight of a table (float -> int4 rows), 0.5 of a Linear layer (int8 -> int4)."""
    from shrinkflow.specs import QuantSpec, Recipe

    model = nn.ModuleDict({"words": nn.Embedding(1000, 32), "positions": nn.Embedding(16, 32),
                           "a": nn.Linear(32, 32), "b": nn.Linear(32, 32)})
    sens = sensitivity.Sensitivity(baseline=1.0, groups=(), layers={
        "int4-dynamic-intx": {"a": 0.0001, "b": 0.003}, "int4-weight-only": {"words": 0.0005, "positions": 0.002}})
    option = sensitivity.QuantOption(name="xnn-int4", runtime="executorch", probe="int8-dynamic-intx",
                                low_bits="int4-dynamic-intx", steps=(
                                    QuantSpec(scheme="int4-dynamic-intx"),
                                    QuantSpec(scheme="int4-weight-only", layers="embedding")))
    # per byte saved: words 0.0005 / 112,000; a 0.0001 / 528; positions 0.002 / 1,792; b 0.003 / 528
    assert [(u, sch) for u, _, sch in precision._option_units(option, sens, model)] == [
        (("words",), "int4-weight-only"), (("a",), "int4-dynamic-intx"), (("positions",), "int4-weight-only"),
        (("b",), "int4-dynamic-intx")]
    shaped = precision.with_groups(option, sens, model, 0.002)  # within 0.001: "words" and "a"
    main, emb4 = shaped.steps
    assert main.include == ("a",) and emb4.include == ("words",)
    Recipe(name="t", steps=shaped.steps, runtime="executorch")  # a valid recipe: each layer kind quantized once
    # an int4-row step with no table chosen is left out, not applied to every table
    none = precision._low_steps(option, {"int4-dynamic-intx": ["a"]}, sens)
    assert [st.scheme for st in none] == ["int4-dynamic-intx"]


def test_the_best_fitting_trained_trial_is_tried_again_under_smaller_quantizations_without_training():
    from tasks.search import REUSE_NOTE, Trial, _enqueue_reuse, _ident, trained

    schemes = {"fp32": None, "int8": "int8-dynamic", "fp16": "fp16", "xnn-fp32": None, "xnn-int8": "int8-dynamic-intx"}
    quant = tuple(sensitivity.QuantOption(name=n, runtime="executorch" if n.startswith("xnn") else "torch",
                                     steps=(QuantSpec(scheme=s),) if s else ()) for n, s in schemes.items())
    sizes = {"fp32": 4000, "int8": 1000, "fp16": 2000, "xnn-fp32": 4000, "xnn-int8": 1000}
    space = search.Space(students=("teacher", "w25-d100"), quant=quant, quant_bytes=sizes)
    assert [p["quant"] for p in search.reuse_params({"student": "w25-d100", "quant": "xnn-fp32"}, space,
                                                    "best-quality")] == ["int8", "xnn-int8", "fp16"]
    assert [p["quant"] for p in search.reuse_params({"quant": "fp16"}, space, "fastest")] == \
        ["fp32", "int8", "xnn-fp32", "xnn-int8"]  # not a size objective: every other option
    spec = SweepSpec(device="rpi4")
    study = optuna.create_study(direction="maximize")
    done = []
    for params, value, fits in (({"student": "teacher", "prune": "none", "quant": "int8"}, 0.99, True),
                                ({"student": "w25-d100", "distill_epochs": 60, "prune": "none", "quant": "xnn-fp32"}, 0.98, True),
                                ({"student": "w25-d100", "distill_epochs": 60, "prune": "none", "quant": "fp32"}, 0.995, False)):
        study.enqueue_trial(params)
        trial = study.ask()
        recipe = search.suggest(trial, space)
        study.tell(trial, value)
        done.append(Trial(number=trial.number, recipe=recipe, state="COMPLETE",
                          result=_result(recipe.name if recipe else "teacher", value, 1000, 1.0, fits)))

    def queued() -> list:
        return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.WAITING]

    # nothing trained fits yet (the student in fp32 misses a limit): nothing is queued
    _enqueue_reuse(study, space, spec, [done[0], done[2]], set(), 4)
    assert queued() == []
    # the best fitting trained trial, though the teacher's int8 scores higher: its training, quantized smaller
    _enqueue_reuse(study, space, spec, done, set(), 2)
    assert len(queued()) == 2
    asked = [study.ask() for _ in range(2)]
    recipes = [search.suggest(t, space) for t in asked]
    assert [r.name.split("+")[-1] for r in recipes] == ["int8", "xnn-int8"]  # the two smallest, capped at 2
    assert all(r.steps[0] == done[1].recipe.steps[0] for r in recipes)  # the same distillation: cached
    assert [t.user_attrs["reuses"] for t in asked] == [1, 1]
    # what is tried already (finished or running) is not queued again
    tried = {_ident(r) for r in recipes}
    _enqueue_reuse(study, space, spec, done, tried, 4)
    assert [search.suggest(t, space).name.split("+")[-1] for t in [study.ask()]] == ["fp16"] and queued() == []
    # a trial that reuses another's training costs no training of its own
    note = f"{REUSE_NOTE} 1's training, quantized another way"
    assert trained([Trial(number=5, state="COMPLETE", note=note), *done]) == len(done)


def _ladder_space() -> search.Space:
    quant = tuple(sensitivity.QuantOption(name=n, runtime="torch", steps=(QuantSpec(scheme=s),) if s else ())
                  for n, s in (("fp32", None), ("fp16", "fp16"), ("int8", "int8-dynamic")))
    params = {"teacher": 1000, "w50-d100": 500, "w50-d67": 400, "w35-d100": 300, "w35-d67": 250, "w25-d100": 200,
              "w25-d67": 150, "w15-d100": 100, "w15-d67": 80, "w10-d100": 60, "w10-d67": 50}
    return search.Space(students=tuple(sorted(params)), student_params=params, quant=quant,
                        prune_methods=("none", "magnitude-global"), prune_ratios={"magnitude-global": (0.2, 0.8)})


def test_the_start_bisects_the_student_ladder_for_the_smallest_student_that_holds():
    space = _ladder_space()
    rungs = search.ladder(space)
    assert rungs[0] == "teacher" and rungs[-1] == "w10-d67"  # by parameters, largest first
    assert search.start_quant(space) == "int8"  # what every engineer tries first
    # nothing known: spread over the ten students, the middle first; the teacher is never picked
    assert search.start_points(space, {}, set(), 1) == ["w25-d100"]
    assert search.start_points(space, {}, set(), 3) == ["w25-d100", "w15-d67", "w50-d67"]
    # w25-d100 held: only smaller students are open; w15-d100 is being trained, so not picked again
    assert search.start_points(space, {"w25-d100": "holds"}, {"w15-d100"}, 2) == ["w10-d100", "w25-d67"]
    # w15-d67 lost quality and w25-d67 held: w15-d100 is the one rung left
    assert search.start_points(space, {"w25-d67": "holds", "w15-d67": "quality"}, set(), 4) == ["w15-d100"]
    # the teacher misses a size limit (the MCU): the students below it only; a student the size
    # floor rejected moves the start below it too
    assert sorted(search.start_points(space, {"teacher": "limit", "w50-d100": "limit"}, set(), 20)) == sorted(rungs[2:])
    # contradicting results (a larger student lost quality where a smaller one held): the sampler takes over
    assert search.start_points(space, {"w50-d67": "quality", "w25-d100": "holds"}, set(), 4) == []
    assert search.start_points(search.Space(students=("teacher",), quant=space.quant), {}, set(), 4) == []


@pytest.mark.parametrize(("fits", "misses", "note", "quality", "objective", "expected"), [
    (True, (), "", 0.99, "best-quality", "holds"),
    (True, (), "", 0.98, "best-quality", "quality"),  # outside the tie band of the best (0.995 - 0.005)
    (True, (), "", 0.98, "smallest", "holds"),  # no tie band for a size objective
    (False, ("max_quality_drop",), "", 0.9, "best-quality", "quality"),
    (False, ("max_quality_drop", "max_size_mb"), "", 0.9, "smallest", "quality"),
    (False, ("max_peak_memory_mb",), "", 0.99, "best-quality", "limit"),
    (None, (), "size floor: the smallest program is over max_size_mb", None, "best-quality", "limit"),
    (None, (), "pruned: at step 1 of the chain", None, "best-quality", "quality"),
    (None, (), "skipped: its training prefix was stopped by the pruner in trial 3", None, "best-quality", "quality"),
    (None, (), "failed: RuntimeError: boom", None, "best-quality", None),
])
def test_what_one_unpruned_student_says_of_the_ladder(fits, misses, note, quality, objective, expected):
    from shrinkflow.specs import Miss

    result = None
    if fits is not None:
        result = _result("s", quality, 1000, 1.0, fits)
        result = result.model_copy(update={"verdict": Verdict(fits=fits, misses=tuple(
            Miss(limit=m, value=2.0, allowed=1.0) for m in misses))})
    assert search.rung_outcome(result, note, objective, 0.995, 0.005) == expected


def test_the_search_starts_from_the_ladder_and_narrows_it_from_the_trials_told():
    from tasks.search import START_ATTR, Trial, _enqueue_start

    space = _ladder_space()
    spec = SweepSpec(device="rpi4")
    study = optuna.create_study(direction="maximize")

    def tell(params: dict, quality: float | None, note: str = "") -> Trial:
        study.enqueue_trial(params)
        trial = study.ask()
        recipe = search.suggest(trial, space)
        result = _result(recipe.name if recipe else "teacher", quality, 1000, 1.0) if quality is not None else None
        study.tell(trial, quality if quality is not None else None,
                   state=optuna.trial.TrialState.COMPLETE if quality is not None else optuna.trial.TrialState.PRUNED)
        return Trial(number=trial.number, recipe=recipe, state="COMPLETE" if quality else "PRUNED", note=note,
                     result=result)

    def queued() -> list[dict]:
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        assert all(t.user_attrs[START_ATTR] for t in waiting)
        asked = [study.ask() for _ in waiting]
        recipes = [search.suggest(t, space) for t in asked]
        assert all(r.steps[-1].scheme == "int8-dynamic" and len(r.steps) == 2 for r in recipes)  # distilled, int8, unpruned
        return [t.params["student"] for t in asked]

    done = [tell({"student": "teacher", "prune": "none", "quant": "int8"}, 0.995)]
    _enqueue_start(study, space, spec, done, 1)
    first = queued()
    assert first == ["w25-d100"]
    # w25-d100 is in flight: the next batch spreads over the others
    _enqueue_start(study, space, spec, done, 2)
    assert queued() == ["w15-d100", "w35-d100"]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # the batch ended; told below as trials of their own
    done += [tell({"student": "w25-d100", "distill_epochs": 60, "prune": "none", "quant": "int8"}, 0.993),
             tell({"student": "w15-d100", "distill_epochs": 60, "prune": "none", "quant": "int8"}, None,
                  "pruned: at step 1 of the chain"),
             # a pruned chain says nothing of its student unpruned
             tell({"student": "w10-d67", "distill_epochs": 60, "prune": "magnitude-global", "quant": "int8",
                   "prune_ratio_magnitude-global": 0.5}, 0.5)]
    # w25-d100 holds (within 0.005 of the teacher's 0.995) and w15-d100 lost quality: w25-d67 is all that is left
    _enqueue_start(study, space, spec, done, 4)
    assert queued() == ["w25-d67"]
    # reuse trials queued first take the batch's places
    study.enqueue_trial({"student": "w25-d100", "distill_epochs": 60, "prune": "none", "quant": "fp16"},
                        user_attrs={START_ATTR: True})
    _enqueue_start(study, space, spec, done, 1)
    assert len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))) == 1
    # the random sampler is the unguided baseline: no start
    assert _enqueue_start(study, space, SweepSpec(device="rpi4", search={"sampler": "random"}), [], 4) is None
    assert len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))) == 1


def test_a_training_batch_times_the_fixed_part_of_a_trial_when_nothing_timed_it_before():
    from flows.search import Clock
    from shrinkflow.specs import DistillSpec, Recipe

    kd = [Recipe(name=f"kd{i}", steps=(DistillSpec(width=1.0, depth=1.0, epochs=10, samples_per_epoch=100, lr=1e-3 * (i + 1)),))
          for i in range(3)]  # 1,000 sample passes each: 100 s at 0.1 s a sample
    timed = [_result("a", 0.9, 1, 1.0).model_copy(update={"seconds": 15.0, "tracking_seconds": 5.0}),
             _result("b", 0.9, 1, 1.0).model_copy(update={"seconds": 18.0, "tracking_seconds": 2.0})]
    clock = Clock(per_sample=0.1, workers=2, n_train=10_000)
    clock.learn(kd[:2], True, 240.0, timed)  # no untrained batch ran: the fixed part was unknown
    assert clock.overhead == 20.0  # each trial's own part besides training
    assert clock.factor == pytest.approx(240.0 / 120.0)  # against the estimate with that part: 100 + 20 s
    clock.learn(kd[2:], True, 240.0, [timed[0].model_copy(update={"seconds": 1.0})])
    assert clock.overhead == 20.0  # a smaller fixed part does not lower it
    assert clock.factor == pytest.approx(2.0)
