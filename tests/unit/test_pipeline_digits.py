import pytest
import torch

from shrinkflow import pipeline, workloads
from shrinkflow.errors import SpecError
from shrinkflow.specs import (
    Budget,
    DistillSpec,
    PruneSpec,
    QuantSpec,
    Recipe,
    SweepSpec,
)
from shrinkflow.workloads.digits import DigitsCNN


@pytest.fixture(scope="module")
def digits_home(digits_teacher):
    """The home the session's teacher was trained into, through workloads.load writing its cache."""
    mp = pytest.MonkeyPatch()
    home = digits_teacher.home
    mp.setenv("SHRINKFLOW_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def digits(digits_home):
    return workloads.load("digits", seed=0)


def test_teacher_is_sensibly_sized_accurate_and_cached(digits, digits_home):
    params = sum(p.numel() for p in digits.teacher.parameters())
    assert 50_000 <= params <= 500_000
    assert workloads.accuracy(digits.teacher, digits.test) >= 0.97
    cached = list((digits_home / "cache" / "teachers").glob("digits-*.pt"))
    assert len(cached) == 1
    again = workloads.load("digits", seed=0)  # from the cache: identical weights
    assert all(torch.equal(a, b) for a, b in zip(digits.teacher.state_dict().values(), again.teacher.state_dict().values()))


def test_default_sweep_covers_every_technique(digits):
    recipes = digits.default_recipes
    assert len(recipes) >= 8
    kinds = {(s.kind, getattr(s, "method", getattr(s, "scheme", None))) for r in recipes for s in r.steps}
    for needed in [("prune", "magnitude-global"), ("prune", "magnitude-layer"), ("prune", "l1-structured"),
                   ("distill", None), ("finetune", None), ("quantize", "int8-dynamic"),
                   ("quantize", "int8-weight-only"), ("quantize", "int8-static"), ("quantize", "fp16")]:
        assert any(k == needed[0] and (needed[1] is None or m == needed[1]) for k, m in kinds), needed
    assert any(len(r.steps) >= 3 for r in recipes)  # a chain
    assert any(s.kind == "quantize" and s.is_local for r in recipes for s in r.steps)  # local quantization
    assert any(s.kind == "prune" and s.iterations > 1 for r in recipes for s in r.steps)  # iterative


def test_student_factory_scales_width_and_depth():
    full = sum(p.numel() for p in DigitsCNN().parameters())
    half = sum(p.numel() for p in DigitsCNN(0.5).parameters())
    shallow = DigitsCNN(1.0, 0.34)
    assert half < full / 3
    assert len(shallow.features) == 1
    assert shallow(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_sweep_selects_a_small_accurate_variant(digits):
    recipes = (
        Recipe(name="kd-w25", steps=(DistillSpec(width=0.25, epochs=40),)),
        Recipe(name="kd-w50+int8", steps=(DistillSpec(width=0.5, epochs=30), QuantSpec(scheme="int8-static"))),
        Recipe(name="too-big", steps=(PruneSpec(method="magnitude-global", ratio=0.1),)),
    )
    result = pipeline.sweep(SweepSpec(device="mcu-nrf52840", recipes=recipes), workload=digits)
    by_name = {v.name: v for v in result.variants}
    assert by_name["too-big"].skipped and "max_size_mb" in by_name["too-big"].skipped
    winner = by_name[result.selection.winner]
    assert winner.report.size_bytes * 10 <= result.teacher.report.size_bytes
    assert winner.report.quality >= result.teacher.report.quality - 0.01
    assert result.teacher_forward_samples == len(digits.train)


def test_a_sweep_that_trains_nothing_never_runs_the_teacher_over_its_training_data(digits, monkeypatch):
    import importlib

    distill = importlib.import_module("shrinkflow.distill")  # the module (the package exports a function of that name)
    calls = []
    forward = distill._forward
    monkeypatch.setattr(distill, "_forward", lambda teacher, inputs, *rest: calls.append(len(inputs[0])) or forward(teacher, inputs, *rest))
    recipes = (Recipe(name="int8", steps=(QuantSpec(scheme="int8-dynamic"),)),
               Recipe(name="pruned-no-ft", steps=(PruneSpec(method="magnitude-global", ratio=0.3, finetune={"epochs": 0}),)))
    result = pipeline.sweep(SweepSpec(device="rpi4", recipes=recipes), workload=digits)
    assert result.teacher_forward_samples == 0 and calls == [] and len(result.variants) == 2
    with_kd = (Recipe(name="kd", steps=(DistillSpec(width=0.25, epochs=1),)),)
    assert pipeline.sweep(SweepSpec(device="rpi4", recipes=with_kd), workload=digits).teacher_forward_samples == len(digits.train)
    assert calls == [len(digits.train)]
    from shrinkflow import steps

    assert not steps.needs_teacher_outputs(recipes)
    assert steps.needs_teacher_outputs(recipes + (Recipe(name="kd", steps=(DistillSpec(width=0.5),)),))


def test_a_recipe_for_a_runtime_the_device_cannot_run_is_not_eligible_and_says_why(digits):
    pte = Recipe(name="xnnpack-int8", runtime="executorch", steps=(QuantSpec(scheme="int8-dynamic-intx"),))
    result = pipeline.sweep(SweepSpec(device="mcu-nrf52840", recipes=(pte,)), workload=digits)
    (variant,) = result.variants
    assert variant.report is None and variant.skipped.startswith("not applicable: runtime 'executorch'")
    assert "mcu-nrf52840" in variant.skipped and result.selection.winner is None


def test_nothing_fits_an_impossible_budget(digits):
    spec = SweepSpec(device="rpi4", budget=Budget(max_size_mb=0.001),
                     recipes=(Recipe(name="kd-w25", steps=(DistillSpec(width=0.25, epochs=2),)),))
    result = pipeline.sweep(spec, workload=digits)
    assert result.selection.winner is None
    assert result.variants[0].skipped or not result.variants[0].fits


def test_plugin_workload_by_import_path(digits_home):
    wl = workloads.load("tests.unit.plugin_workload:make", seed=3)
    assert wl.name == "plugin" and wl.extra["seed"] == 3


@pytest.mark.parametrize(("ref", "match"), [
    ("nosuch", "Unknown workload 'nosuch'"),
    ("tests.unit.nosuch:make", "cannot be imported"),
    ("tests.unit.plugin_workload:missing", "cannot be imported"),
    ("tests.unit.plugin_workload:not_a_workload", "returned 'dict'"),
    ("tests.unit.plugin_workload:mismatched", "do not match its labels"),
    ("tests.unit.plugin_workload:empty", "field 'test' is empty"),
])
def test_bad_workloads_are_refused(ref, match):
    with pytest.raises(SpecError, match=match):
        workloads.load(ref)


def test_digits_read_without_sklearn_match_load_digits():
    from sklearn.datasets import load_digits

    from shrinkflow.workloads.digits import digits_arrays

    images, labels = digits_arrays()
    data = load_digits()
    assert images.shape == (1797, 8, 8) and labels.dtype == torch.long
    assert torch.equal(images, torch.tensor(data.images, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(data.target, dtype=torch.long))
