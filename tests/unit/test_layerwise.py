"""Layer-wise distillation: the losses against hand-written references, layer discovery and maps,
cached teacher targets, and students that differ from the teacher in width and head count."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from shrinkflow import layerwise, pipeline
from shrinkflow.cache import DirCache
from shrinkflow.errors import SpecError
from shrinkflow.layerwise import (
    Plan,
    TeacherTargets,
    find_blocks,
    hidden_loss,
    layer_map,
    relation_loss,
    shallower,
)
from shrinkflow.specs import DistillSpec, Recipe
from tests.unit import plugin_workload


@pytest.fixture(scope="module")
def pair():
    """The two-input BERT classifier workload (its teacher trained once for this module)."""
    return plugin_workload.bert_pair(0)


def _without_factory(wl):
    out = copy.copy(wl)
    out.make_student = None
    return out


def _bert(hidden=32, layers=4, heads=4):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=2 * hidden, max_position_embeddings=16)).eval()


def test_hidden_loss_matches_a_loop_over_real_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    proj = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        errs = [((proj.weight @ s[b, i] - t[b, i]) ** 2).mean() for b in range(2) for i in range(5) if mask[b, i]]
    assert hidden_loss(s, t, mask, proj).detach().item() == pytest.approx(float(sum(errs) / len(errs)), rel=1e-5)
    assert hidden_loss(t, t).item() == 0.0


def _relation_reference(s: torch.Tensor, t: torch.Tensor, heads: int, mask: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        keys = [j for j in range(s.shape[1]) if mask[b, j]]
        for i in keys:
            kl = 0.0
            for r in range(heads):
                dists = []
                for x in (s, t):
                    d = x.shape[-1] // heads
                    h = x[b, :, r * d:(r + 1) * d]
                    scores = torch.tensor([float(h[i] @ h[j]) / math.sqrt(d) for j in keys])
                    dists.append(torch.softmax(scores, 0))
                p_s, p_t = dists
                kl += float((p_t * (p_t.log() - p_s.log())).sum())
            total += kl / heads
            count += 1
    return total / count


def test_relation_loss_matches_a_loop_and_allows_different_widths():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 12)  # the student is half as wide: 2 relation heads of 3 vs 6
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert relation_loss(s, t, 2, mask).item() == pytest.approx(_relation_reference(s, t, 2, mask), rel=1e-4)
    assert relation_loss(t, t, 3, mask).item() == pytest.approx(0.0, abs=1e-6)
    # padding keys are left out: changing a padded token changes nothing
    s2 = s.clone()
    s2[0, 3] += 10.0
    assert relation_loss(s2, t, 2, mask).item() == pytest.approx(relation_loss(s, t, 2, mask).item(), rel=1e-6)


def test_blocks_are_found_in_hugging_face_encoders_and_not_in_other_models():
    from transformers import DistilBertConfig, DistilBertModel

    bert = find_blocks(_bert())
    assert bert is not None and len(bert) == 4 and bert.heads == (4,) * 4 and bert.width == 32
    distil = find_blocks(DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2, hidden_dim=64)))
    assert distil is not None and len(distil) == 3 and distil.heads == (2,) * 3
    assert find_blocks(plugin_workload.mobilenet()) is None
    with pytest.raises(SpecError, match="DistillSpec.hidden.*transformer layers"):
        layerwise.blocks_of(nn.GRU(4, 4), "DistillSpec.hidden")


def test_shallower_keeps_evenly_spread_teacher_layers_with_their_weights():
    teacher = _bert(layers=4)
    student = shallower(teacher, 0.5)
    assert layerwise.pick_layers(4, 2) == [1, 3] and layerwise.pick_layers(6, 3) == [1, 3, 5]
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert len(teacher.encoder.layer) == 4  # a copy
    for s_i, t_i in ((0, 1), (1, 3)):
        assert torch.equal(student.encoder.layer[s_i].attention.self.query.weight, teacher.encoder.layer[t_i].attention.self.query.weight)
    ids = torch.randint(1, 50, (2, 7))
    assert student(input_ids=ids).last_hidden_state.shape == (2, 7, 32)


def test_a_layer_map_with_a_bad_index_is_refused_naming_the_field():
    teacher, student = find_blocks(_bert(layers=4)), find_blocks(_bert(layers=2))
    assert layer_map(None, teacher, student) == [1, 3]
    assert layer_map((0, 2), teacher, student) == [0, 2]
    with pytest.raises(SpecError, match=r"DistillSpec.layer_map=\[0, 4\].*each in 0..3"):
        layer_map((0, 4), teacher, student)
    with pytest.raises(SpecError, match="DistillSpec.layer_map.*2 teacher layer indices"):
        layer_map((1,), teacher, student)
    with pytest.raises(ValidationError, match="layer_map"):
        DistillSpec(layer_map=(0, -1), hidden=1.0)
    with pytest.raises(ValidationError, match="layer_map is used only by the layer-wise losses"):
        DistillSpec(layer_map=(0, 1))
    with pytest.raises(ValidationError, match="width=0.5 with init='parent'"):
        DistillSpec(init="parent", width=0.5)
    assert DistillSpec(init="parent").width == 1.0


def _targets(cache, memory_bytes=layerwise.MEMORY_BYTES):
    teacher = _bert(layers=4)
    ids = torch.randint(1, 50, (300, 12))
    ids[:, 9:] = 0  # padding: every chunk is cut to 9 columns
    plan = Plan(hidden=(1, 3), relation_teacher=3, heads=4)
    return teacher, TeacherTargets(teacher, (ids,), ("input_ids",), plan, "teacher-key", cache, memory_bytes)


def test_teacher_targets_are_cached_and_a_rerun_runs_no_teacher_pass(tmp_path):
    cache = DirCache(tmp_path)
    teacher, first = _targets(cache)
    assert first.chunks == 2
    chunk = first.chunk(0)
    assert chunk["inputs"][0].shape == (256, 9) and chunk["hidden"].shape == (2, 256, 9, 32)
    assert chunk["qkv"].shape == (3, 256, 9, 32) and chunk["hidden"].dtype == torch.float16
    first.chunk(1)
    assert first.forward_samples == 300
    calls = []
    _, again = _targets(cache)
    again.teacher.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(again.chunk(0)["hidden"], chunk["hidden"]) and again.chunk(1) is not None
    assert again.forward_samples == 0 and calls == []
    assert len(list((tmp_path / "teacher-layers").rglob("*.pt"))) == 2


def test_a_stored_chunk_holds_its_own_rows_not_the_whole_split(tmp_path):
    """Each chunk's inputs and mask are stored as copies: a view would carry the storage of every
    training sample into every chunk (torch.save keeps whole storages)."""
    cache = DirCache(tmp_path)
    _, targets = _targets(cache)
    targets.chunk(0)
    _, again = _targets(cache)
    chunk = again.chunk(0)  # read back from the store
    for t in (*chunk["inputs"], chunk["mask"], chunk["hidden"], chunk["qkv"]):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), t.shape


def test_targets_beyond_the_memory_bound_are_read_from_the_store_each_time(tmp_path):
    cache = DirCache(tmp_path)
    reads = []
    get = cache.get
    cache.get = lambda key: reads.append(key) or get(key)
    _, targets = _targets(cache, memory_bytes=0)
    targets.chunk(0)
    targets.chunk(0)
    assert targets.forward_samples == 256 and len(reads) == 2  # computed once, then read back, not held


def test_streamed_targets_are_read_once_per_chunk_in_an_epoch_not_once_per_batch(pair, tmp_path, monkeypatch):
    """Targets beyond the memory bound come from the store; training takes every batch of a chunk in a row, so
    each chunk an epoch visits is read once (512 samples: 16 batches of 32 from 2 chunks of 256)."""
    from shrinkflow import steps

    made = []

    def streamed(*args, **kwargs):
        objective = layerwise.build_objective(*args, **kwargs)
        objective.targets.memory_bytes = 0  # nothing held in memory
        made.append(objective)
        return objective

    monkeypatch.setattr(steps, "build_objective", streamed)
    cache = DirCache(tmp_path)
    reads = []
    get = cache.get
    cache.get = lambda key: (reads.append(key) if key.startswith("teacher-layers/") else None) or get(key)
    spec = DistillSpec(init="parent", depth=0.5, epochs=2, samples_per_epoch=512, hidden=1.0)
    pipeline.build(pipeline.context(_without_factory(pair), cache, 0), Recipe(name="s", steps=(spec,)))
    assert len(made) == 1 and made[0].targets.memory_bytes == 0
    assert len(reads) == 4, reads  # 2 chunks in each of 2 epochs (the first epoch computes and stores them)


def test_a_narrower_student_with_fewer_heads_learns_from_the_relations(pair):
    """A random 16-wide, 1-head-per-8 student of a 32-wide BERT classifier: output-only KD stops well
    short of the teacher, the layer-wise terms (projection 16 -> 32, 2 relation heads) take it there."""
    wl = pair
    ctx = pipeline.context(wl, None, 0)
    spec = DistillSpec(width=0.5, depth=0.5, epochs=10, hidden=1.0, relations=1.0)
    student, _ = pipeline.build(ctx, Recipe(name="lw", steps=(spec,)))
    plain, _ = pipeline.build(pipeline.context(wl, None, 0), Recipe(name="kd", steps=(DistillSpec(width=0.5, depth=0.5, epochs=10),)))
    t_blocks, s_blocks = find_blocks(wl.teacher), find_blocks(student)
    assert s_blocks.width == 16 and t_blocks.width == 32 and len(s_blocks) == 1
    layered, output_only = wl.quality(student, wl.test), wl.quality(plain, wl.test)
    assert layered >= wl.quality(wl.teacher, wl.test) - 0.03 and layered > output_only + 0.05, (layered, output_only)
    assert ctx.stats["layer_target_samples"] == len(wl.train)


def test_a_student_made_of_the_parents_layers_needs_no_factory(pair, tmp_path):
    """``init: parent``: the teacher's own layers (no make_student; the more important one), trained with every term; its
    teacher targets come from the store on a rerun."""
    wl = _without_factory(pair)
    spec = DistillSpec(init="parent", depth=0.5, epochs=2, hidden=1.0, relations=1.0, layers="important")
    ctx = pipeline.context(wl, tmp_path, 0)
    model, _ = pipeline.build(ctx, Recipe(name="p", steps=(spec,)))
    assert len(find_blocks(model)) == 1 and wl.quality(model, wl.test) >= wl.quality(wl.teacher, wl.test) - 0.03
    again = pipeline.context(wl, tmp_path, 0)
    pipeline.build(again, Recipe(name="p2", steps=(spec.model_copy(update={"epochs": 3}),)))
    assert again.stats.get("layer_target_samples") == 0


def test_important_layers_are_the_ones_whose_removal_costs_most():
    teacher = _bert(layers=4)
    blocks = find_blocks(teacher)
    # keep_layers deep-copies: map the copies back to the teacher's layers by their weights
    def by_weights(model):
        total = 0.0
        for layer in find_blocks(model).layers:
            for t_layer, w in zip(blocks.layers, (0.3, 0.1, 0.5, 0.2), strict=True):
                if torch.equal(layer.attention.self.query.weight, t_layer.attention.self.query.weight):
                    total += w
        return total

    assert by_weights(teacher) == pytest.approx(1.1)
    assert layerwise.important_layers(teacher, 0.5, by_weights) == [0, 2]
    assert layerwise.important_layers(teacher, 0.75, by_weights) == [0, 2, 3]


def test_choosing_important_layers_needs_the_teachers_own_layers(pair):
    wl = pair  # it has a student factory
    from shrinkflow import steps

    with pytest.raises(SpecError, match="layers='important' picks among the teacher's own layers"):
        steps.check_capabilities(wl, (Recipe(name="r", steps=(DistillSpec(layers="important"),)),))
    steps.check_capabilities(wl, (Recipe(name="r", steps=(DistillSpec(init="parent", layers="important"),)),))
    with pytest.raises(SpecError, match=r"DistillSpec.init='parent'.*needs transformer layers"):
        steps.check_capabilities(plugin_workload.make(), (Recipe(name="r", steps=(DistillSpec(init="parent"),)),))
