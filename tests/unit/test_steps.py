"""The prefix cache: each distinct training prefix is computed once, reused by every recipe and
sweep that shares it, refused by checksum when corrupt, and stored once when workers race."""

from __future__ import annotations

import threading

import pytest
import torch

from shrinkflow import pipeline, steps
from shrinkflow.cache import DirCache
from shrinkflow.errors import SpecError
from shrinkflow.specs import DistillSpec, FinetuneSpec, PruneSpec, QuantSpec, Recipe
from tests.unit import plugin_workload

KD = DistillSpec(width=0.5, epochs=3)
PRUNE = PruneSpec(method="l1-structured", ratio=0.25, finetune=FinetuneSpec(epochs=1))
RECIPES = (
    Recipe(name="kd+int8", steps=(KD, QuantSpec(scheme="int8-dynamic"))),
    Recipe(name="kd+wo", steps=(KD, QuantSpec(scheme="int8-weight-only"))),
    Recipe(name="kd+prune", steps=(KD, PRUNE)),
    Recipe(name="kd+prune+int8", steps=(KD, PRUNE, QuantSpec(scheme="int8-dynamic"))),
)


def _ctx(tmp_path):
    return pipeline.context(plugin_workload.make(), tmp_path / "cache", 0)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_shared_prefixes_are_computed_once_and_a_rerun_computes_none(tmp_path):
    ctx = _ctx(tmp_path)
    built = {r.name: pipeline.build(ctx, r)[0] for r in RECIPES}
    assert ctx.stats == {"computed": 2, "reused": 3}  # kd once, kd+prune once; the rest loaded
    again = _ctx(tmp_path)
    rebuilt = {r.name: pipeline.build(again, r)[0] for r in RECIPES}
    assert again.stats == {"computed": 0, "reused": 4}
    x = plugin_workload.make().test.tensors[0]
    for name in built:
        assert torch.equal(built[name](x), rebuilt[name](x)), name


def test_a_structurally_pruned_prefix_loads_into_its_rebuilt_shape(tmp_path):
    ctx = _ctx(tmp_path)
    first, _ = steps.materialize(ctx, [KD, PRUNE])
    loaded, _ = steps.materialize(_ctx(tmp_path), [KD, PRUNE])
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in first.parameters()]
    assert loaded[0].out_features < 16  # pruned: the half-width student's 16 hidden units, fewer now
    assert all(torch.equal(a, b) for a, b in zip(_weights(first).values(), _weights(loaded).values(), strict=True))


def test_a_corrupt_prefix_is_refused_by_checksum_and_recomputed(tmp_path):
    ctx = _ctx(tmp_path)
    model, keys = steps.materialize(ctx, [KD])
    blob = tmp_path / "cache" / f"prefixes/{keys[0]}.pt"
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    again = _ctx(tmp_path)
    remade, _ = steps.materialize(again, [KD])
    assert again.stats == {"computed": 1, "reused": 0}
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(remade).values(), strict=True))
    assert steps.materialize(_ctx(tmp_path), [KD]) and DirCache(tmp_path / "cache").get(f"prefixes/{keys[0]}.pt")


class CountingCache(DirCache):
    def __init__(self, root) -> None:
        super().__init__(root)
        self.created, self.lock = 0, threading.Lock()

    def put(self, key, data, replace=False):
        made = super().put(key, data, replace)
        with self.lock:
            self.created += made and key.startswith("prefixes/")
        return made


def test_two_workers_racing_for_a_prefix_store_it_once_and_build_on_the_same_weights(tmp_path):
    cache = CountingCache(tmp_path / "cache")
    ctxs = [pipeline.context(plugin_workload.make(), cache, 0) for _ in range(2)]
    barrier, out = threading.Barrier(2), {}

    def work(i):
        barrier.wait()
        out[i] = _weights(steps.materialize(ctxs[i], [KD])[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.created == 1
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_a_step_needing_a_missing_capability_is_refused_naming_recipe_step_and_capability():
    wl = plugin_workload.make()
    wl.make_student = None
    with pytest.raises(SpecError, match=r"Recipe 'kd\+int8' steps\[0\] \(distill\) needs the workload's 'make_student'"):
        steps.check_capabilities(wl, RECIPES)


def test_size_floor_and_cost_come_from_each_step_kind():
    ctx_free = steps.STEPS
    assert ctx_free["distill"].cost(KD, 1.0) == (1.5, 0.5)
    assert ctx_free["prune"].cost(PRUNE, 0.5) == (0.5, 0.5)
    assert ctx_free["quantize"].cost(QuantSpec(), 0.5) == (0.0, 0.5)


def test_a_loaded_prefix_ships_the_same_size_as_a_computed_one(tmp_path):
    """Whether a worker computed a prefix or loaded it, the shipped program is the same size."""
    from shrinkflow import artifact

    recipe = Recipe(name="prune-50", steps=(PruneSpec(ratio=0.5, finetune=FinetuneSpec(epochs=1)),))
    computed, _ = pipeline.build(_ctx(tmp_path), recipe)
    loaded_ctx = _ctx(tmp_path)
    loaded, _ = pipeline.build(loaded_ctx, recipe)
    assert loaded_ctx.stats["reused"] == 1
    example = plugin_workload.make().example_inputs
    assert len(artifact.pack(computed, example).data) == len(artifact.pack(loaded, example).data)


def test_plan_is_a_tree_of_distinct_prefixes_parents_first():
    nodes, leaf_of = steps.plan(RECIPES + (Recipe(name="int8", steps=(QuantSpec(),)),))
    assert [n.label for n in nodes] == ["distill-w50-d100-e3", "distill-w50-d100-e3+prune-l1-structured-25"]
    assert [n.kind for n in nodes] == ["distill", "prune"] and nodes[1].parent == 0
    assert leaf_of == {"kd+int8": 0, "kd+wo": 0, "kd+prune": 1, "kd+prune+int8": 1, "int8": None}


def test_a_reused_prefix_replays_its_validation_curve_to_the_monitor(tmp_path):
    """A search trial built on a stored prefix is told the scores that prefix saw when it trained,
    so a run over a warm cache prunes (and so asks and picks) exactly as the cold run did."""
    chain = (KD, PRUNE)

    def watched(ctx):
        seen = []
        token = steps.MONITOR.set(lambda step, score: seen.append((step.index, step.kind, step.epochs, score)))
        try:
            steps.materialize(ctx, chain)
        finally:
            steps.MONITOR.reset(token)
        return seen

    cold_ctx = _ctx(tmp_path)
    cold = watched(cold_ctx)
    assert cold_ctx.stats == {"computed": 2, "reused": 0}
    told = [s[:2] for s in cold]  # told live, step by step: the distillation's scores, then the pruning's
    assert told[0] == (0, "distill") and told[-1] == (1, "prune") and told == sorted(told)
    warm_ctx = _ctx(tmp_path)
    assert watched(warm_ctx) == cold  # nothing trained, the same scores told in the same order
    assert warm_ctx.stats == {"computed": 0, "reused": 1}
    shorter = _ctx(tmp_path)  # reusing only the first step: its curve replayed, the second step's told live
    token = steps.MONITOR.set(lambda step, score: shorter_seen.append((step.index, step.kind, step.epochs, score)))
    shorter_seen: list = []
    try:
        steps.materialize(shorter, (KD, PruneSpec(method="l1-structured", ratio=0.5, finetune=FinetuneSpec(epochs=1))))
    finally:
        steps.MONITOR.reset(token)
    assert shorter_seen[:3] == cold[:3] and shorter.stats == {"computed": 1, "reused": 1}
