"""Out-of-domain evaluation sets: recorded per set, judged on the worst set, and MiniLM's own."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow import budget, pipeline
from shrinkflow.errors import SpecError
from shrinkflow.specs import Budget, Recipe, Report, VariantResult, VocabSpec
from shrinkflow.steps import context
from shrinkflow.workloads import Workload, accuracy
from tests.unit import plugin_workload

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, IN_DOMAIN = 40, 20  # training text uses token ids 1..19; the OOD set only 20..39


class BagOfTokens(nn.Module):
    """Embedding + mean pooling over non-zero ids + linear + L2 norm: (B, L) ids -> (B, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).float()  # (B, L, 1)
        pooled = (self.emb(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, 16)
        return nn.functional.normalize(self.proj(pooled), dim=-1)


def cosine(model: nn.Module, split: TensorDataset) -> float:
    ids, reference = split.tensors
    with torch.inference_mode():
        return float(nn.functional.cosine_similarity(model(ids), reference, dim=-1).mean())


def forget_unseen(train_ids: torch.Tensor):
    """A vocab-like step: tokens the training split never uses all share one row (the first kept)."""
    seen = torch.bincount(train_ids.flatten(), minlength=VOCAB) > 0

    def apply(model: BagOfTokens, spec: VocabSpec) -> BagOfTokens:
        with torch.no_grad():
            model.emb.weight[~seen] = model.emb.weight[int(seen.nonzero()[0])].clone()
        return model

    return apply


def token_workload() -> Workload:
    torch.manual_seed(0)
    teacher = BagOfTokens().eval()
    gen = torch.Generator().manual_seed(1)

    def split(n: int, low: int, high: int) -> TensorDataset:
        ids = torch.randint(low, high, (n, 6), generator=gen)
        with torch.inference_mode():
            return TensorDataset(ids, teacher(ids))

    train = split(64, 1, IN_DOMAIN)
    return Workload(name="tokens", teacher=teacher, train=TensorDataset(train.tensors[0]), val=split(32, 1, IN_DOMAIN),
                    test=split(32, 1, IN_DOMAIN), quality=cosine, quality_name="cosine", task="embedding",
                    shrink_vocab=forget_unseen(train.tensors[0]), dynamic_dims=(0,),
                    ood={"other": split(32, IN_DOMAIN, VOCAB)}, ood_baselines={"other": 1.0}).check()


LIMITS = Budget(max_quality_drop=0.02)


def test_vocab_like_step_passes_in_domain_but_is_rejected_on_the_ood_set():
    wl = token_workload()
    ctx = context(wl, None)
    profile, _ = budget.resolve("rpi4")
    teacher, _ = pipeline.evaluate(ctx, "teacher", wl.teacher, None, profile, LIMITS, None)
    assert teacher.fits and teacher.report.extra["quality_drop_ood_other"] == 0.0
    result, _ = pipeline.run_variant(ctx, Recipe(name="vocab", steps=(VocabSpec(),)), profile, LIMITS, teacher.report.quality)
    extra = result.report.extra
    assert result.report.quality == pytest.approx(1.0, abs=1e-5)  # in-domain: unchanged
    assert extra["quality_ood_other"] < 0.9 and extra["quality_drop_ood_other"] == pytest.approx(1.0 - extra["quality_ood_other"])
    assert not result.fits
    (miss,) = result.verdict.misses
    assert miss.limit == "max_quality_drop" and miss.worst_set == "ood:other"
    assert miss.value == pytest.approx(extra["quality_drop_ood_other"])
    # A cached record is judged again from its report alone, to the same end.
    again = pipeline.rejudge(result, Budget(max_quality_drop=0.5), teacher.report.quality)
    assert again.fits == (extra["quality_drop_ood_other"] <= 0.5)


def _report(**extra) -> Report:
    return Report(size_bytes=1000, raw_size_bytes=2000, params=10, nonzero_params=10, sparsity=0.0, macs=5,
                  latency_p50_ms=1.0, latency_p95_ms=2.0, peak_memory_bytes=10_000, energy_mj=1.0,
                  energy_source="estimated", threads=1, artifact_format="torch.export", quality=0.99, extra=extra)


def test_max_quality_drop_is_judged_on_the_worst_set():
    report = _report(quality_drop_ood_a=0.05, quality_drop_ood_b=0.03, quality_ood_a=0.95, spearman=0.9)
    assert budget.quality_drops(report, 0.99, 1.0) == pytest.approx({"test": 0.01, "ood:a": 0.05, "ood:b": 0.03})
    (miss,) = budget.check(report, 0.99, 1.0, Budget(max_quality_drop=0.04)).misses
    assert (miss.limit, miss.value, miss.worst_set) == ("max_quality_drop", 0.05, "ood:a")
    assert budget.check(report, 0.99, 1.0, Budget(max_quality_drop=0.05)).fits
    (miss,) = budget.check(_report(quality_drop_ood_a=0.001), 0.9, 1.0, Budget(max_quality_drop=0.04)).misses
    assert miss.worst_set == "test" and miss.value == pytest.approx(0.1)
    broken = budget.check(_report(quality_drop_ood_a=float("nan")), 0.99, 1.0, Budget(max_quality_drop=0.5))
    assert not broken.fits and broken.misses[0].worst_set == "ood:a"
    old = VariantResult(name="v", report=_report(), verdict=None)  # a record from before OOD sets: in-domain only
    assert pipeline.rejudge(old, Budget(max_quality_drop=0.02), 1.0).fits


def test_classifier_ood_baseline_is_the_teachers_quality_measured_once():
    wl = plugin_workload.make()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(9)) * 3 + 1  # another input distribution
    wl.ood = {"shifted": TensorDataset(x, x[:, :3].argmax(-1))}
    calls = []
    wl.quality = lambda m, split: calls.append(split) or accuracy(m, split)
    expected = accuracy(wl.teacher, wl.ood["shifted"])
    assert wl.check().ood_baseline("shifted") == expected and wl.ood_baseline("shifted") == expected
    assert len(calls) == 1
    metrics = pipeline.ood_metrics(wl, wl.teacher)
    assert metrics == {"quality_ood_shifted": expected, "quality_drop_ood_shifted": 0.0}


def test_ood_sets_are_validated():
    wl = plugin_workload.make()
    wl.ood = {"bad name": wl.test}
    with pytest.raises(SpecError, match="'ood' entry 'bad name'"):
        wl.check()


def test_minilm_ood_set_is_1000_prose_sentences_disjoint_from_its_splits():
    from shrinkflow.workloads import minilm, ood_text

    sentences = ood_text.python_docs(minilm.split_sentences)
    assert len(sentences) == len(set(sentences)) == ood_text.N_OOD == 1000
    assert not set(sentences) & set(minilm.bbc_sentences())
    assert sentences == ood_text.python_docs(minilm.split_sentences)  # fixed by the seed
    ids = minilm.ood_ids()
    assert ids.shape == (1000, minilm.MAX_LENGTH) and int((ids != 0).sum(1).min()) >= 7
    rows = {tuple(r.tolist()) for r in ids}
    for split in minilm.splits(0):
        assert not rows & {tuple(r.tolist()) for r in split}


def test_minilm_extra_text_is_wikipedia_prose_disjoint_from_every_evaluation_set():
    from shrinkflow.workloads import extra_text, minilm, ood_text

    _, val, test = minilm.split_texts(0)
    ood = ood_text.python_docs(minilm.split_sentences, exclude=minilm.bbc_sentences())
    wiki = extra_text.wikipedia(minilm.split_sentences)
    assert len(wiki) == len(set(wiki)) >= extra_text.MIN_WIKI
    assert all(ood_text.is_prose(s) and "''" not in s for s in wiki)  # no wiki emphasis marks left
    assert any("Aristotle" in s for s in wiki) and any("Albedo" in s or "albedo" in s for s in wiki)
    # An evaluation sentence that also occurs in the excerpt is dropped from it.
    assert wiki[5] not in extra_text.wikipedia(minilm.split_sentences, exclude=[wiki[5]])
    ids = minilm.extra_train_ids(0)
    assert len(ids) <= len(wiki) and ids.shape[1] == minilm.MAX_LENGTH
    rows = {tuple(r.tolist()) for r in ids}
    for split in (minilm.encode(val), minilm.encode(test), minilm.encode(ood)):
        assert not rows & {tuple(r.tolist()) for r in split}
    # The extra text carries vocabulary the news lacks: most of the pydoc tokens the news never uses.
    news = set(minilm.splits(0)[0].unique().tolist())
    ood_tokens = set(minilm.encode(ood).unique().tolist())
    missing = ood_tokens - news
    assert len(missing & set(ids.unique().tolist())) > 0.5 * len(missing)


def test_minilm_truncates_at_the_models_own_length():
    from shrinkflow.workloads import minilm

    assert minilm.model_max_length() == minilm.MAX_LENGTH == 256
    long_text = " ".join(["word"] * 400)
    assert len(minilm.tokenizer().encode(long_text).ids) == 256
    assert len(minilm.tokenizer(max_length=64).encode(long_text).ids) == 64


def test_mixed_int4_int8_scheme_lowers_to_executorch_and_stays_close():
    """The MiniLM recipe's scheme: int4 (groups of 32) on the selected layers, int8 on the other Linear layers."""
    pytest.importorskip("executorch", reason="the executorch package (the minilm extra) is not installed")
    from shrinkflow import artifact
    from shrinkflow.quantize import quantize
    from shrinkflow.specs import QuantSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    spec = QuantSpec(scheme="int4-dynamic-intx", layers="linear", include=("0",), keep_float=("4",))
    q = quantize(model, spec, ())
    assert tuple(q[0].weight.block_size) == (1, 32) and int(q[0].weight.qdata.min()) >= -8 and int(q[0].weight.qdata.max()) <= 7
    assert tuple(q[2].weight.block_size) == (1, 128)  # int8, one scale per output channel
    assert type(q[4].weight) is nn.Parameter  # keep_float
    x = torch.randn(5, 64)
    packed = artifact.pack(q, (x[:1],), (0,), "executorch")
    with torch.inference_mode():
        expected, got = model(x), artifact.unpack(packed)(x)
    assert float(nn.functional.cosine_similarity(got, expected, dim=-1).min()) > 0.98


def test_a_miss_on_an_out_of_domain_set_names_the_set():
    from shrinkflow.specs import Miss

    assert Miss(limit="max_quality_drop", value=0.05, allowed=0.02, worst_set="ood:pydoc").label == \
        "max_quality_drop (ood:pydoc)"
    assert Miss(limit="max_quality_drop", value=0.05, allowed=0.02, worst_set="test").label == "max_quality_drop"
