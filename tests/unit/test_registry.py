"""Every choice the spec offers has a handler: walking the spec's Literals, nothing is left unserved."""

from __future__ import annotations

import typing

import pytest
from torch import nn

from shrinkflow import steps
from shrinkflow.errors import SpecError
from shrinkflow.quantize import SCHEMES, selected_layers
from shrinkflow.specs import (
    SCHEME_LAYERS,
    LayerKind,
    QuantScheme,
    QuantSpec,
    Step,
    parse,
)

SCHEME_NAMES = typing.get_args(QuantScheme)


def _step_kinds() -> set[str]:
    union = typing.get_args(Step)[0]
    return {typing.get_args(cls.model_fields["kind"].annotation)[0] for cls in typing.get_args(union)}


def test_every_step_kind_has_a_handler():
    assert _step_kinds() == set(steps.STEPS)


def test_every_scheme_has_a_handler_and_its_layer_kinds():
    assert set(SCHEME_NAMES) == set(SCHEMES) == set(SCHEME_LAYERS)
    assert set(typing.get_args(LayerKind)) >= {k for kinds in SCHEME_LAYERS.values() for k in kinds}


MODEL = nn.Sequential(nn.Embedding(50, 8), nn.Conv1d(4, 4, 1), nn.Linear(8, 8), nn.GRU(8, 8))


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_every_scheme_with_default_layers_selects_what_it_claims(scheme):
    """The drift once seen: a scheme the spec validated with layers='all' raised KeyError in quantize()."""
    spec = QuantSpec(scheme=scheme)
    chosen = selected_layers(MODEL, spec)
    assert chosen, f"{scheme} selects nothing with layers='all'"
    kinds = {"0": "embedding", "1": "conv", "2": "linear", "3": "rnn"}
    assert {kinds[name] for name in chosen} == set(SCHEME_LAYERS[scheme]) - {"all"}


def test_a_layer_kind_no_scheme_serves_is_refused_at_validation_naming_the_field():
    with pytest.raises(SpecError, match="layers"):
        parse(QuantSpec, {"scheme": "int8-dynamic", "layers": "embedding"})
    with pytest.raises(SpecError, match="scheme"):
        parse(QuantSpec, {"scheme": "int3-magic"})


def test_every_runtime_has_a_packer_and_an_unknown_one_is_refused_naming_the_field():
    from shrinkflow.artifact import RUNTIMES
    from shrinkflow.specs import Recipe, Runtime

    assert set(typing.get_args(Runtime)) == set(RUNTIMES)
    with pytest.raises(SpecError, match="runtime"):
        parse(Recipe, {"name": "r", "runtime": "tflite", "steps": [{"kind": "quantize"}]})


def test_the_size_floor_of_a_quantize_step_is_the_schemes_own_bit_width():
    ctx = None  # the quantize step's floor reads nothing from the context
    for name, scheme in SCHEMES.items():
        _, bytes_per = steps.STEPS["quantize"].size_floor(ctx, 1000, 4.0, QuantSpec(scheme=name))
        assert bytes_per == scheme.weight_bits / 8
