
import pytest
import torch
from torch import nn

from shrinkflow import artifact
from shrinkflow.prune import _step_amount, prune_
from shrinkflow.specs import FinetuneSpec, PruneSpec


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("method", ["magnitude-global", "magnitude-layer"])
def test_unstructured_is_permanent_with_requested_sparsity(toy, example, method):
    res = prune_(toy, PruneSpec(method=method, ratio=0.6), example)
    assert res.sparsity == pytest.approx(0.6, abs=0.01)
    assert not any("mask" in k or "orig" in k for k in toy.state_dict())  # no masks left behind
    assert not toy._forward_pre_hooks and all(not m._forward_pre_hooks for m in toy.modules())
    if method == "magnitude-layer":  # every layer individually at the ratio
        for w in _weights(toy):
            assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.02)


def test_global_magnitude_removes_smallest_weights(toy, example):
    before = torch.cat([w.detach().abs().flatten() for w in _weights(toy)])
    threshold = before.kthvalue(int(0.5 * len(before))).values
    prune_(toy, PruneSpec(method="magnitude-global", ratio=0.5), example)
    after = torch.cat([w.detach().flatten() for w in _weights(toy)])
    kept = before[after != 0]
    assert kept.min() >= threshold


def test_sparsity_shows_in_shipped_size(toy, example):
    dense = artifact.pack(toy, example)
    prune_(toy, PruneSpec(method="magnitude-global", ratio=0.9), example)
    sparse = artifact.pack(toy, example)
    assert sparse.raw_size == pytest.approx(dense.raw_size, rel=0.05)  # same dense layout...
    assert len(sparse.data) < 0.45 * len(dense.data)  # ...but the shipped artifact shrinks


def test_iterative_schedule_fine_tunes_between_steps(toy, example):
    calls = []
    prune_(toy, PruneSpec(method="magnitude-layer", ratio=0.75, iterations=3), example,
           finetune=lambda m, ft: calls.append(float(sum((w == 0).sum() for w in _weights(m)))))
    assert len(calls) == 3 and calls[0] < calls[1] < calls[2]
    assert _step_amount(0.75, 1, 3) == pytest.approx(0.25)
    assert 1 - (1 - 0.25) * (1 - _step_amount(0.75, 2, 3)) == pytest.approx(0.5)


def test_masks_keep_pruned_weights_zero_during_finetuning(toy, example, toy_data):
    def train(model, ft):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = toy_data.tensors
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    res = prune_(toy, PruneSpec(method="magnitude-global", ratio=0.5), example, finetune=train)
    assert res.sparsity >= 0.5


@pytest.mark.parametrize("method", ["l1-structured", "l2-structured"])
def test_structured_removes_channels_physically(toy, example, method):
    base_out = toy(*example).shape
    size_before = len(artifact.pack(toy, example).data)
    res = prune_(toy, PruneSpec(method=method, ratio=0.5), example)
    assert toy.conv1.out_channels == 4 and toy.conv2.out_channels == 8
    assert toy.fc2.out_features == 4  # output layer untouched
    assert res.params_after < 0.4 * res.params_before
    assert toy(*example).shape == base_out
    assert len(artifact.pack(toy, example).data) < 0.5 * size_before


class TinyAttention(nn.Module):
    """BERT-style self-attention with separate q/k/v projections and 8-dim heads."""

    head_dim = 8

    def __init__(self, heads: int = 4):
        super().__init__()
        d = heads * self.head_dim
        self.q, self.k, self.v = nn.Linear(32, d), nn.Linear(32, d), nn.Linear(32, d)
        self.o = nn.Linear(d, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):  # (B, T, 32) -> (B, 3)
        b, t, _ = x.shape
        h = self.q.out_features // self.head_dim  # heads left after pruning
        split = lambda z: z.view(b, t, h, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        att = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(self.o(att.transpose(1, 2).reshape(b, t, -1)).mean(1))


def test_structured_prunes_whole_attention_heads():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    example = (torch.randn(1, 5, 32),)
    before = sum(p.numel() for p in model.parameters())
    prune_(model, PruneSpec(method="l1-structured", ratio=0.5), example,
           num_heads={model.q: 4, model.k: 4, model.v: 4}, ignored=[model.out, model.o])
    assert model.q.out_features == model.k.out_features == model.v.out_features == 2 * TinyAttention.head_dim
    assert model.o.in_features == 16
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(*example).shape == (1, 3)


def test_a_callers_ignored_layers_add_to_the_output_layer_never_replace_it(toy, example):
    """A user's prune_ignored once replaced the default: a 4-way head was pruned to 3 outputs."""
    prune_(toy, PruneSpec(method="l1-structured", ratio=0.5, finetune=FinetuneSpec(epochs=0)), example,
           ignored=[toy.conv1])
    assert toy.fc2.out_features == 4 and toy.conv1.out_channels == 8  # both kept whole
    assert toy.conv2.out_channels < 16 and toy(example[0]).shape == (1, 4)


class _BertClassifier(nn.Module):
    """A two-input Hugging Face classifier built from a config (no download), as users bring them."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, num_labels=5)
        self.m = BertForSequenceClassification(cfg)

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask).logits


def test_hugging_face_attention_loses_whole_heads_without_hooks():
    """Once, a query projection was pruned to 89 channels and the model failed on its reshape."""
    from shrinkflow.prune import attention_heads

    torch.manual_seed(0)
    model = _BertClassifier().eval()
    att = model.m.bert.encoder.layer[0].attention.self
    assert attention_heads(model)[att.query] == 4 and len(attention_heads(model)) == 6
    ids = torch.randint(1, 300, (2, 11))
    prune_(model, PruneSpec(method="l1-structured", ratio=0.5, finetune=FinetuneSpec(epochs=0)), (ids, torch.ones_like(ids)))
    assert att.query.out_features == 2 * att.attention_head_size == 64 and att.num_attention_heads == 2
    longer = torch.randint(1, 300, (3, 17))
    assert model(longer, torch.ones_like(longer)).shape == (3, 5)  # other lengths, all 5 classes kept
