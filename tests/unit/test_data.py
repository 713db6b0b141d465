"""Models with several or keyword inputs and Hugging Face outputs, data from any Dataset or DataLoader."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shrinkflow import artifact, data, pipeline, steps
from shrinkflow.budget import resolve
from shrinkflow.errors import SpecError
from shrinkflow.specs import FinetuneSpec, PruneSpec, QuantSpec, Recipe
from shrinkflow.workloads import Workload, accuracy
from tests.unit import plugin_workload as pw

INPUTS = ("input_ids", "attention_mask")


@pytest.fixture(scope="module")
def columns():
    return pw._token_data(300, seed=5)


@pytest.fixture(scope="module")
def bert():
    return pw.bert_pair(seed=0).check()


def test_map_style_and_iterable_dict_data_become_inputs_then_labels_in_order(columns):
    expected = (columns["input_ids"], columns["attention_mask"], columns["labels"])
    for source in (pw.DictRows(columns), DataLoader(pw.DictStream(columns), batch_size=64),
                   DataLoader(pw.DictRows(columns), batch_size=7)):
        split = data.as_split(source, INPUTS)
        assert len(split.tensors) == 3 and all(torch.equal(a, b) for a, b in zip(split.tensors, expected, strict=True))
    class Batches(torch.utils.data.IterableDataset):  # a stream that yields whole batches itself
        def __iter__(self):
            for i in range(0, 300, 64):
                yield {k: v[i:i + 64] for k, v in columns.items()}

    split = data.as_split(DataLoader(Batches(), batch_size=None), INPUTS)
    assert all(torch.equal(a, b) for a, b in zip(split.tensors, expected, strict=True))
    unlabeled = {k: v for k, v in columns.items() if k != "labels"}
    assert len(data.as_split(pw.DictStream(unlabeled), INPUTS).tensors) == 2  # labels are optional


def _mapped_split_files() -> list[str]:
    with open("/proc/self/maps") as f:
        return sorted({line.split(maxsplit=5)[-1].strip() for line in f if "shrinkflow-split-" in line})


def test_a_split_over_the_memory_threshold_is_read_into_mapped_files_and_trains_the_same(columns, monkeypatch, tmp_path):
    """Past SPILL_BYTES a split goes, batch by batch, to files that are mapped and unlinked: the
    page cache holds it (a data set larger than memory), the values and every step are unchanged."""
    monkeypatch.setattr(data, "SPILL_BYTES", 20_000)  # 300 x (16 + 16 + 1) int64 = 79 kB: spills after batch 0
    monkeypatch.setenv("SHRINKFLOW_SPILL_DIR", str(tmp_path))
    before = _mapped_split_files()
    stream = DataLoader(pw.DictStream(columns), batch_size=64)
    mapped = data.as_split(stream, INPUTS)
    held = TensorDataset(*(columns[k] for k in (*INPUTS, "labels")))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(mapped.tensors, held.tensors, strict=True))
    files = [f for f in _mapped_split_files() if f not in before]
    assert len(files) == 3 and all(f.endswith("(deleted)") for f in files), files  # mapped, unlinked, nothing left
    assert list(tmp_path.iterdir()) == []
    probe = nn.Linear(2, 2)
    assert steps.content_hash(probe, mapped.tensors) == steps.content_hash(probe, held.tensors)

    def accuracy_after_training(split):
        torch.manual_seed(0)
        wl = Workload(name="bert", teacher=pw.bert_classifier(), inputs=INPUTS, train=split, val=held, test=held,
                      quality=accuracy, make_student=pw.bert_classifier)
        ctx = steps.context(wl, None, 0)
        recipe = Recipe(name="ft", steps=(FinetuneSpec(epochs=1, lr=1e-3),))
        result, _ = pipeline.run_variant(ctx, recipe, *resolve("rpi4", None), 1.0)
        return result.report.quality

    assert accuracy_after_training(mapped) == accuracy_after_training(held)


def test_tuple_batches_with_two_inputs_and_a_plain_tensor_dataset(columns):
    rows = TensorDataset(columns["input_ids"], columns["attention_mask"], columns["labels"])
    split = data.as_split(DataLoader(rows, batch_size=50), 2)
    assert torch.equal(split.tensors[1], columns["attention_mask"]) and len(split) == 300
    assert data.as_split(rows, 2) is rows


@pytest.mark.parametrize(("source", "inputs", "message"), [
    (lambda c: pw.DictRows(c), 2, "field 'inputs' to name the keys"),
    (lambda c: pw.DictRows(c), ("input_ids", "token_type_ids"), "no key 'token_type_ids'"),
    (lambda c: [("a sentence", 1)] * 4, 1, "expected tensors only"),
    (lambda c: [(torch.zeros(3 + i % 2), 0) for i in range(300)], 1, "pad every sample to one length"),
    (lambda c: DataLoader([(torch.zeros(3 + i // 10), 0) for i in range(30)], batch_size=10), 1, "pad every sample"),
    (lambda c: TensorDataset(c["labels"]), 2, "expected at least the 2 model input"),
    (lambda c: [], 1, "yielded no batches"),
    (lambda c: DataLoader(pw.DictRows(c), batch_size=8, shuffle=True), INPUTS, "expected shuffle=False"),
    (lambda c: None, 1, "field 'train' is 'NoneType'"),
])
def test_data_that_cannot_be_a_split_is_refused_naming_what_was_expected(columns, source, inputs, message):
    with pytest.raises(SpecError, match=message):
        data.as_split(source(columns), inputs, where="Workload 'w' field 'train'")


def test_the_prediction_is_found_in_hugging_face_outputs_or_must_be_named():
    from transformers.modeling_outputs import (
        BaseModelOutputWithPooling,
        SequenceClassifierOutput,
    )

    logits = torch.randn(2, 3)
    assert data.choose_output(SequenceClassifierOutput(logits=logits), "classification") == "logits"
    assert data.choose_output((logits, torch.randn(2, 4)), "classification") == 0
    assert data.choose_output(logits, "classification") is None
    hidden = BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 5, 4), pooler_output=torch.randn(2, 4))
    assert data.choose_output(hidden, "embedding") == "pooler_output"
    with pytest.raises(SpecError, match="Workload field 'output'"):
        data.choose_output(BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 5, 4)), "embedding")


def test_a_keyword_input_hugging_face_teacher_is_called_positionally_and_returns_its_logits(bert):
    assert isinstance(bert.teacher, data.Call) and bert.output == "logits" and bert.n_inputs == 2
    ids, mask = bert.example_inputs
    assert ids.shape == mask.shape == (1, pw.BERT_LEN)
    assert torch.equal(bert.teacher(ids, mask), bert.teacher.model(input_ids=ids, attention_mask=mask).logits)
    assert isinstance(bert.make_student(0.5, 1.0), data.Call) and bert.make_student(0.5, 1.0)(ids, mask).shape == (1, 3)
    assert torch.equal(bert.labels(bert.test), pw._token_data(400, 2)["labels"])
    assert accuracy(bert.teacher, bert.test) > 0.9
    # the attention mask matters: with every position unmasked the teacher is worse
    ids, mask, labels = bert.test.tensors
    assert accuracy(bert.teacher, TensorDataset(ids, torch.ones_like(mask), labels)) < accuracy(bert.teacher, bert.test) - 0.05


def test_labels_out_of_range_or_a_wrong_input_count_are_refused_before_anything_runs(columns):
    bad = dict(columns, labels=columns["labels"] + 3)
    with pytest.raises(SpecError, match="labels in field 'train'.*covering every label"):
        Workload(name="b", teacher=pw.bert_classifier().eval(), inputs=INPUTS, train=pw.DictRows(bad),
                 val=pw.DictRows(columns), test=pw.DictRows(columns), quality=accuracy).check()
    negative = dict(columns, labels=columns["labels"] - 1)
    with pytest.raises(SpecError, match=r"labels in field 'test' \(-1\.\.1"):  # every split, not just train
        Workload(name="b", teacher=pw.bert_classifier().eval(), inputs=INPUTS, train=pw.DictRows(columns),
                 val=pw.DictRows(columns), test=DataLoader(pw.DictStream(negative), batch_size=64), quality=accuracy).check()
    pairs = TensorDataset(torch.randn(8, 4), torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(SpecError, match="teacher fails on the example inputs"):  # nn.Bilinear takes two
        Workload(name="b", teacher=nn.Bilinear(4, 4, 3), train=pairs, val=pairs, test=pairs, quality=accuracy).check()
    assert Workload(name="b", teacher=nn.Bilinear(4, 4, 3), inputs=2, train=pairs, val=pairs, test=pairs,
                    quality=accuracy).check().n_inputs == 2
    with pytest.raises(SpecError, match="field 'inputs'"):
        Workload(name="b", teacher=pw.bert_classifier().eval(), inputs=0, train=pw.DictRows(columns),
                 val=pw.DictRows(columns), test=pw.DictRows(columns), quality=accuracy)


def test_two_input_bert_is_pruned_by_whole_heads_quantized_and_shipped(bert, tmp_path):
    profile, limits = resolve("rpi4", None)
    ctx = steps.context(bert, tmp_path, 0)
    ft = FinetuneSpec(epochs=1)
    recipes = (Recipe(name="heads", steps=(PruneSpec(method="l1-structured", ratio=0.5, finetune=ft),)),
               Recipe(name="int8", steps=(QuantSpec(scheme="int8-weight-only"),)))  # ExecuTorch: tests/integration/test_byo_models.py
    ids, mask = bert.example_inputs
    for recipe in recipes:
        result, packed = pipeline.run_variant(ctx, recipe, profile, limits, None)
        assert result.report is not None, (recipe.name, result.skipped)
        assert result.report.quality > 0.8
        shipped = artifact.unpack(packed)
        assert shipped(ids, mask).shape == (1, 3) and shipped(ids.repeat(3, 1), mask.repeat(3, 1)).shape == (3, 3)
    pruned, _ = steps.materialize(ctx, recipes[0].steps)  # from the prefix cache the sweep filled
    attention = pruned.model.bert.encoder.layer[0].attention.self
    assert attention.num_attention_heads == 1 and attention.query.out_features == attention.attention_head_size
    assert pruned.model.classifier.out_features == 3  # the output layer is kept whole


def test_user_hooks_get_the_users_model_and_a_student_returning_a_tensor_passes_through(bert, tmp_path):
    import dataclasses

    seen = []
    wl = dataclasses.replace(bert, prune_ignored=lambda m: seen.append(type(m).__name__) or [m.bert.pooler.dense])
    ctx = steps.context(wl, tmp_path, 0)
    model = steps.STEPS["prune"].restructure(ctx, copy.deepcopy(wl.teacher), PruneSpec(method="l1-structured", ratio=0.5))
    assert seen == ["BertForSequenceClassification"]  # not the positional wrapper around it
    assert model.model.bert.pooler.dense.out_features == 32 and model.model.classifier.out_features == 3
    plain = data.Call(nn.Linear(4, 3), output="logits")  # a student that returns the tensor itself
    assert plain(torch.ones(2, 4)).shape == (2, 3)


def test_shipped_inputs_are_named_as_the_teacher_takes_them_whatever_wraps_a_variant(bert, columns):
    from shrinkflow.quantize import quantize
    from shrinkflow.specs import QuantSpec

    assert bert.input_names == INPUTS
    wl = pw.make()
    assert wl.input_names == ("input",)  # nn.Sequential.forward(input)
    half = quantize(wl.teacher, QuantSpec(scheme="fp16"), wl.example_inputs)  # a wrapper taking *args
    packed = artifact.pack(half, wl.example_inputs)
    assert [i["name"] for i in artifact.input_spec(packed.data, packed.format, names=wl.input_names)] == ["input"]
