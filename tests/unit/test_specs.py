import pytest

from shrinkflow import budget
from shrinkflow.errors import SpecError
from shrinkflow.specs import Budget, PruneSpec, QuantSpec, Recipe, SweepSpec, flatten, parse


@pytest.mark.parametrize(
    ("model", "data", "field", "expected"),
    [
        (PruneSpec, {"ratio": 1.5}, "ratio", "less than 1"),
        (PruneSpec, {"ratio": -0.1}, "ratio", "greater than 0"),
        (PruneSpec, {"method": "random"}, "method", "'magnitude-global'"),
        (QuantSpec, {"scheme": "int4"}, "scheme", "'int8-dynamic'"),
        (QuantSpec, {"scheme": "int8-dynamic", "layers": "conv"}, "<root>", "['all', 'linear']"),
        (Budget, {"max_size_mb": -1}, "max_size_mb", "greater than 0"),
        (Budget, {"max_latency_ms": 0}, "max_latency_ms", "greater than 0"),
        (Recipe, {"name": "x", "steps": [{"kind": "sparsify"}]}, "steps.0", "'distill', 'prune', 'finetune', 'quantize'"),
        (SweepSpec, {"colour": "red"}, "colour", "Unknown field"),
    ],
)
def test_bad_specs_raise_spec_error_naming_the_field(model, data, field, expected):
    with pytest.raises(SpecError) as err:
        parse(model, data)
    assert repr(field) in str(err.value) or field == "<root>"
    assert expected in str(err.value)


def test_quantize_must_come_last():
    with pytest.raises(SpecError, match="after a quantize step"):
        parse(Recipe, {"name": "r", "steps": [{"kind": "quantize"}, {"kind": "prune"}]})


def test_duplicate_recipe_names_rejected():
    r = {"name": "a", "steps": [{"kind": "quantize"}]}
    with pytest.raises(SpecError, match="duplicate names"):
        parse(SweepSpec, {"recipes": [r, r]})


def test_unknown_device_lists_presets():
    with pytest.raises(SpecError) as err:
        budget.device("toaster")
    assert "'toaster'" in str(err.value) and "rpi4" in str(err.value)


def test_budget_override_is_laid_over_preset():
    prof, limits = budget.resolve("rpi4", Budget(max_size_mb=5))
    assert limits.max_size_mb == 5
    assert limits.max_latency_ms == prof.budget.max_latency_ms
    assert limits.threads == prof.budget.threads


def test_spec_hash_is_stable_and_content_based():
    a, b = SweepSpec(seed=1), SweepSpec(seed=1)
    assert a.spec_hash() == b.spec_hash() != SweepSpec(seed=2).spec_hash()


def test_specs_are_frozen():
    spec = PruneSpec()
    with pytest.raises(Exception):
        spec.ratio = 0.9


def test_flatten_for_mlflow_params():
    flat = flatten(Recipe(name="r", steps=(PruneSpec(ratio=0.3),)).model_dump())
    assert flat["steps.0.ratio"] == "0.3"
    assert flat["steps.0.finetune.scheduler"] == "cosine"


def test_every_preset_cites_a_source_and_has_limits():
    for prof in budget.DEVICES.values():
        assert prof.source.startswith("http")
        assert prof.budget.max_size_mb and prof.budget.max_latency_ms and prof.active_power_w > 0


def test_device_choices_are_exactly_the_presets():
    from typing import get_args

    from shrinkflow.specs import DeviceName

    assert set(get_args(DeviceName)) == set(budget.DEVICES)
    with pytest.raises(SpecError, match="field 'device'"):
        parse(SweepSpec, {"device": "toaster"})
