"""``hf:PATH`` workloads: a Hugging Face model directory, its tokenizer and a data file of texts."""

from __future__ import annotations

import json

import pytest
import torch

from shrinkflow import workloads
from shrinkflow.errors import SpecError
from shrinkflow.specs import SweepSpec, parse
from tests.unit.plugin_workload import news_rows, save_hf_dir, write_rows

pytest.importorskip("transformers", reason="transformers (the minilm extra) is not installed")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path / "home"))  # teacher outputs are cached there


@pytest.fixture(scope="module")
def rows():
    return news_rows(articles=8, per_article=4)  # 160 sentences, 5 topics


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("hf")
    return save_hf_dir(root / "news-bert", rows=rows, epochs=3), write_rows(root / "news.jsonl", rows)


def load(path, task, data, **kw):
    return workloads.load(f"hf:{path}", 0, None, task=task, data=str(data), **kw)


def test_classifier_directory_is_a_two_input_workload_with_its_labels_and_tokenizer(classifier, rows):
    path, data = classifier
    wl = load(path, "sequence-classification", data)
    assert wl.name == "news-bert" and wl.inputs == ("input_ids", "attention_mask") and wl.task == "classification"
    sizes = [len(s) for s in (wl.train, wl.val, wl.test)]
    assert sum(sizes) == len(rows) and sizes[0] == int(0.8 * len(rows)) and min(sizes) > 0
    length = wl.train.tensors[0].shape[1]
    assert length <= 64  # the config's max_position_embeddings bounds the tokenizer's 512
    assert wl.max_dims[1] == 64 and wl.dynamic_dims == (0, 1)
    # the longest input users send, timed beside the median one: max_length real tokens, no padding
    assert [tuple(t.shape) for t in wl.longest] == [(1, 64), (1, 64)] and bool(wl.longest[1].all())
    assert wl.teacher(*wl.longest).shape == (1, 5)
    config = json.loads((path / "config.json").read_text())
    # labels are the config's own ids for the topic names in the file
    texts = {r["text"]: config["label2id"][r["label"]] for r in rows}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    first = tok.decode(wl.test.tensors[0][0][wl.test.tensors[1][0].bool()], skip_special_tokens=True)
    match = [label for text, label in texts.items() if tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == first]
    assert match and int(wl.test.tensors[2][0]) == match[0]
    files = wl.files(wl.teacher)
    assert {"tokenizer.json", "tokenizer_config.json", "hf_program.json"} <= set(files)
    program = json.loads(files["hf_program.json"])
    assert program["output"]["labels"] == {str(k): v for k, v in config["id2label"].items()}
    assert list(program["inputs"]) == ["input_ids", "attention_mask"] and program["max_length"] == 64
    direct = workloads.accuracy(wl.teacher, wl.test)
    assert wl.quality(wl.teacher, wl.test) == direct and direct > 0.3  # 5 classes: chance is 0.2


def test_split_column_is_honoured(tmp_path, classifier, rows):
    path, _ = classifier
    names = ["train"] * 100 + ["validation"] * 30 + ["test"] * 30
    data = write_rows(tmp_path / "split.jsonl", [{**r, "split": s} for r, s in zip(rows, names, strict=True)])
    wl = load(path, "sequence-classification", data)
    assert [len(s) for s in (wl.train, wl.val, wl.test)] == [100, 30, 30]


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", True), ("mean", False)])
def test_sentence_embedding_directory_pools_as_its_config_says(tmp_path, rows, pooling, normalize):
    path = save_hf_dir(tmp_path / "enc", task="sentence-embedding", rows=rows, pooling=pooling, normalize=normalize)
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(r["text"] for r in rows))
    wl = load(path, "sentence-embedding", data)
    assert wl.task == "embedding" and wl.quality_name == "cosine" and set(wl.ood) == {"pydoc"}
    ids, mask = wl.test.tensors[:2]
    out = wl.teacher(ids[:4], mask[:4])
    hidden = wl.teacher.model.encoder(input_ids=ids[:4], attention_mask=mask[:4]).last_hidden_state
    m = mask[:4].unsqueeze(-1).float()
    expected = hidden[:, 0] if pooling == "cls" else (hidden * m).sum(1) / m.sum(1)
    if normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert wl.quality(wl.teacher, wl.test) == pytest.approx(1.0, abs=1e-5)
    assert wl.quality(wl.teacher, wl.ood["pydoc"]) == pytest.approx(1.0, abs=1e-5)
    assert set(wl.extra_metrics(wl.teacher, wl.test)) == {"cosine_p5", "cosine_min"}


def test_the_packaged_sentence_transformers_directory_embeds_like_the_builtin_minilm():
    from shrinkflow.workloads import hf, minilm

    model = hf.load_model(minilm.model_dir(), "sentence-embedding")
    assert (model.pooling, model.normalize) == ("mean", True)
    ids = minilm.encode(["A short sentence.", "Another, somewhat longer sentence about the weather."], pad_to=None)
    mask = (ids != minilm.PAD_ID).long()
    with torch.inference_mode():
        assert torch.allclose(model(ids, mask), minilm.load_teacher()(ids), atol=1e-5)


def test_hf_spec_needs_task_and_data_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="needs 'task'"):
        parse(SweepSpec, {"workload": "hf:model", "data": "x.jsonl"})
    with pytest.raises(SpecError, match="needs 'data'"):
        parse(SweepSpec, {"workload": "hf:model", "task": "sentence-embedding"})
    with pytest.raises(SpecError, match="only with an 'hf:PATH' workload"):
        parse(SweepSpec, {"workload": "digits", "task": "sentence-embedding"})
    with pytest.raises(SpecError, match="task"):
        parse(SweepSpec, {"workload": "hf:model", "task": "translation", "data": "x.jsonl"})
    spec = parse(SweepSpec, {"workload": "hf:model", "task": "sentence-embedding", "data": "x.txt"})
    assert spec.workload == f"hf:{tmp_path / 'model'}" and spec.data == str(tmp_path / "x.txt")
    assert parse(SweepSpec, spec.model_dump()) == spec  # validated again in a worker: unchanged


@pytest.mark.parametrize(("case", "match"), [
    ("missing-file", r"SweepSpec.data=.* is not a file"),
    ("suffix", r"has suffix '.xml'; expected .csv"),
    ("few-rows", r"holds 3 rows; expected at least 30"),
    ("no-text", r"expected a text column named one of \['text', 'sentence'\]"),
    ("unknown-label", r"has label 'weather'; expected one of the model's labels"),
    ("label-range", r"has label 5; expected 0..4"),
    ("no-label", r"has no 'label'"),
    ("txt-classify", r"is plain text; expected .* 'label' column"),
    ("max-length", r"SweepSpec.max_length=100 is over the model's limit 64"),
    ("no-config", r"has no config.json"),
    ("bad-split", r"has split 'holdout'; expected one of"),
])
def test_bad_hf_input_is_refused_naming_the_field(tmp_path, classifier, rows, case, match):
    path, data = classifier
    task, kw = "sequence-classification", {}
    if case == "missing-file":
        data = tmp_path / "nope.jsonl"
    elif case == "suffix":
        data = tmp_path / "d.xml"
        data.write_text("x")
    elif case == "few-rows":
        data = write_rows(tmp_path / "d.jsonl", rows[:3])
    elif case == "no-text":
        data = write_rows(tmp_path / "d.jsonl", [{"body": r["text"], "label": r["label"]} for r in rows])
    elif case == "unknown-label":
        data = write_rows(tmp_path / "d.jsonl", [*rows[:40], {"text": "Rain all day.", "label": "weather"}])
    elif case == "label-range":
        data = write_rows(tmp_path / "d.jsonl", [{"text": r["text"], "label": i % 8} for i, r in enumerate(rows)])
    elif case == "no-label":
        data = write_rows(tmp_path / "d.jsonl", [{"text": r["text"]} for r in rows])
    elif case == "txt-classify":
        data = tmp_path / "d.txt"
        data.write_text("\n".join(r["text"] for r in rows))
    elif case == "max-length":
        kw = {"max_length": 100}
    elif case == "no-config":
        path = tmp_path
    elif case == "bad-split":
        data = write_rows(tmp_path / "d.jsonl", [{**r, "split": "holdout"} for r in rows])
    with pytest.raises(SpecError, match=match):
        load(path, task, data, **kw)
