"""A sweep derived from the model when a workload brings no recipes (never an empty sweep)."""

from __future__ import annotations

import torch
from torch import nn

from shrinkflow import auto, budget, pipeline
from shrinkflow.specs import Budget, QuantSpec, Recipe, SweepSpec, parse
from tests.unit import plugin_workload


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(16, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x):  # (B, T, 16) -> (B, 5)
        return self.head(self.gru(x)[0][:, -1])


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_census_of_a_cnn_and_a_gru():
    cnn, gru = auto.census(bn_cnn()), auto.census(GRUClassifier())
    assert cnn["conv"] > 0.5 and "rnn" not in cnn and abs(sum(cnn.values()) - 1) < 1e-9
    assert gru["rnn"] > 0.95 and gru["linear"] < 0.02


def test_plugin_workload_without_recipes_gets_a_real_sweep():
    wl = plugin_workload.make()
    assert wl.default_recipes == ()
    spec = parse(SweepSpec, {"workload": "tests.unit.plugin_workload:make", "device": "rpi4", "workload_recipes": True})
    recipes = pipeline.recipes_for(spec, wl, budget.resolve("rpi4", None)[1])
    names = [r.name for r in recipes]
    assert len(recipes) >= 6 and len(set(names)) == len(names)
    kinds = {s.kind for r in recipes for s in r.steps}
    assert kinds == {"quantize", "prune", "distill"}
    assert "int8-static" not in names  # no conv layers: no static conv quantization offered
    assert all(auto.not_applicable(wl.teacher, r) is None for r in recipes)


def test_cnn_gets_static_int8_and_a_tight_budget_puts_chains_first():
    recipes = auto.default_recipes(bn_cnn(), "classification", True, Budget(max_size_mb=0.000_5))
    assert "int8-static" in {r.name for r in recipes}
    assert len(recipes[0].steps) == max(len(r.steps) for r in recipes)
    chains = [r for r in recipes if len(r.steps) > 1]  # the convolutions, not the head, go int8 in chains
    assert chains and all(r.steps[-1].scheme == "int8-static" for r in chains)
    rnn_chains = [r for r in auto.default_recipes(GRUClassifier(), "classification", True, Budget()) if len(r.steps) > 1]
    assert rnn_chains and all(r.steps[-1].layers == "rnn" for r in rnn_chains)


def test_quantizing_only_the_head_of_a_gru_is_not_applicable():
    model = GRUClassifier()
    why = auto.not_applicable(model, Recipe(name="q", steps=(QuantSpec(scheme="int8-dynamic"),)))
    assert why is not None and why.startswith("not applicable: int8-dynamic") and "rnn" in why
    names = {r.name for r in auto.default_recipes(model, "classification", False, Budget())}
    assert "int8-dynamic" not in names  # a Linear head of under 1% is not offered as a variant


def test_hf_bert_from_a_config_gets_linear_and_embedding_schemes():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    names = {r.name for r in auto.default_recipes(BertModel(cfg), "embedding", False, Budget())}
    assert {"int8-dynamic", "int8-weight-only", "int8-weight-only-embedding"} <= names
    assert not any(n.startswith("kd-w") for n in names)  # no student factory: no narrower students
    # ... but a transformer distils into half of its own layers, learning their states too
    layered = {r.name: r for r in auto.default_recipes(BertModel(cfg), "embedding", False, Budget())}["kd-layers-d50"]
    kd = layered.steps[0]
    assert (kd.init, kd.depth, kd.loss, kd.hidden, kd.relations) == ("parent", 0.5, "cosine", 1.0, 1.0)


class ScaledLinear(nn.Module):
    """Nearly all parameters outside any quantizable layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10_000))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x) * self.scale[:3]


def test_not_applicable_variant_is_recorded_not_trained(tmp_path):
    wl = plugin_workload.make()
    wl.teacher = ScaledLinear().eval()
    ctx = pipeline.context(wl, tmp_path, 0)
    profile, limits = budget.resolve("rpi4", None)
    recipe = Recipe(name="int8-dynamic", steps=(QuantSpec(scheme="int8-dynamic"),))
    result, packed = pipeline.run_variant(ctx, recipe, profile, limits, 0.5)
    assert packed is None and result.report is None
    assert result.skipped.startswith("not applicable: int8-dynamic") and "0.2% of the parameters" in result.skipped


def test_a_mobilenet_with_batchnorm_depthwise_and_residuals_survives_every_technique(tmp_path):
    from shrinkflow import steps
    from shrinkflow.specs import DistillSpec, FinetuneSpec, PruneSpec

    wl = plugin_workload.mobilenet_digits().check()
    profile, limits = budget.resolve("rpi4", None)
    ctx = steps.context(wl, tmp_path, 0)
    teacher, _ = pipeline.evaluate(ctx, "teacher", wl.teacher, None, profile, limits, None)
    assert teacher.report.quality > 0.95
    ft = FinetuneSpec(epochs=3)
    recipes = (Recipe(name="channels", steps=(PruneSpec(method="l1-structured", ratio=0.3, finetune=ft),)),
               Recipe(name="int8-static", steps=(QuantSpec(scheme="int8-static"),)),
               Recipe(name="ort-int8", runtime="onnx", steps=(QuantSpec(scheme="int8-static-ort"),)),
               Recipe(name="kd-w50+int8", steps=(DistillSpec(width=0.5, epochs=10), QuantSpec(scheme="int8-static"))))
    for recipe in recipes:
        result, _ = pipeline.run_variant(ctx, recipe, profile, limits, teacher.report.quality)
        assert result.report is not None, (recipe.name, result.skipped)
        assert result.report.size_bytes < teacher.report.size_bytes, recipe.name
        assert result.report.quality > (0.9 if "int8" in recipe.name and "kd" not in recipe.name else 0.8), \
            (recipe.name, result.report.quality)
    pruned, _ = steps.materialize(ctx, recipes[0].steps)
    depthwise = pruned[3].block[3]  # the first block's depthwise conv: still one group per channel
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels < 64
    assert pruned[-1].out_features == 10  # the output layer is whole
