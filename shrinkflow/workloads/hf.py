"""A Hugging Face model from a local directory: ``--workload hf:PATH --task ... --data FILE``.

``PATH`` is a directory written by ``save_pretrained`` (``config.json``, the weights, and the
tokenizer's files, ``tokenizer.save_pretrained`` into the same directory); nothing is downloaded.
Two tasks:

- ``sequence-classification``: ``AutoModelForSequenceClassification``; the program takes
  ``input_ids`` and ``attention_mask`` and returns the logits; quality is accuracy on the labels.
- ``sentence-embedding``: ``AutoModel`` with the pooling of a sentence-transformers directory
  (``1_Pooling/config.json``: mean, CLS or max; ``modules.json`` listing ``Normalize``: L2
  normalised; neither file: mean pooling, not normalised), inside the program; quality is the
  mean cosine similarity to the teacher's embeddings. The out-of-domain set ``pydoc`` (prose of
  the Python Language Reference, :mod:`shrinkflow.workloads.ood_text`) is added, so a variant is
  also judged on English unlike the user's text.

``FILE`` holds the text, one row per sample: ``.csv``, ``.tsv``, ``.jsonl`` (one JSON object per
line) with a ``text`` (or ``sentence``) column, an optional ``text_pair`` column (sentence-pair
tasks), a ``label`` column for classification (integers, or names found in the model config's
``label2id``, else numbered in sorted order), and an optional ``split`` column (``train``,
``validation``/``val``, ``test``); without it the rows are split 80/10/10 by a permutation fixed
by the seed. A ``.txt`` file is one text per line (sentence-embedding only).

Every text is tokenized once, truncated at ``max_length`` (default: the model's own limit: the
sentence-transformers ``max_seq_length``, else the tokenizer's ``model_max_length``, else the
config's ``max_position_embeddings``) and padded to the longest in the data. The program takes
any batch and any length up to ``max_length``. The tokenizer's files ship beside every variant's
program, with ``hf_program.json`` describing the inputs, the output and the labels.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow.cache import BlobCache, DirCache
from shrinkflow.distill import teacher_outputs
from shrinkflow.errors import SpecError
from shrinkflow.workloads import Workload, accuracy, home, ood_text

logger = logging.getLogger(__name__)

TASKS = ("sequence-classification", "sentence-embedding")
TEXT_COLUMNS = ("text", "sentence")
FRACTIONS = (0.8, 0.1)  # train, validation; the rest is test
MIN_ROWS = 30
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "dev": "val", "test": "test"}
PROGRAM_FILE = "hf_program.json"
OOD_NAME = "pydoc"
#: Tokens one call of an ExecuTorch program takes at most (batch x length), as for MiniLM.
PTE_TOKENS_PER_CALL = 1024
POOLING = ("mean", "cls", "max")


def _where(path: str) -> str:
    return f"Workload 'hf:{path}'"


# ---------------------------------------------------------------- data


def read_rows(data: str) -> list[dict]:
    """The rows of ``data`` (see the module docstring), each a dict of column -> value."""
    path = Path(data)
    if not path.is_file():
        raise SpecError(f"SweepSpec.data={data!r} is not a file; expected a .csv, .tsv, .jsonl or .txt file of texts.")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="," if suffix == ".csv" else "\t"))
    elif suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SpecError(f"SweepSpec.data={data!r} line {n} is not JSON ({exc.msg}); expected one JSON object per line.") from None
                if not isinstance(row, dict):
                    raise SpecError(f"SweepSpec.data={data!r} line {n} is {type(row).__name__}; expected a JSON object per line.")
                rows.append(row)
    elif suffix == ".txt":
        rows = [{"text": line.strip()} for line in text.splitlines() if line.strip()]
    else:
        raise SpecError(f"SweepSpec.data={data!r} has suffix {suffix!r}; expected .csv, .tsv, .jsonl or .txt.")
    if len(rows) < MIN_ROWS:
        raise SpecError(f"SweepSpec.data={data!r} holds {len(rows)} rows; expected at least {MIN_ROWS} (train, validation and test are cut from it).")
    column = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
    if column is None:
        raise SpecError(f"SweepSpec.data={data!r} has columns {sorted(rows[0])}; expected a text column named one of {list(TEXT_COLUMNS)}.")
    for n, row in enumerate(rows):
        if not isinstance(row.get(column), str) or not row[column].strip():
            raise SpecError(f"SweepSpec.data={data!r} row {n} has no text in column {column!r}; expected a non-empty string.")
        row["text"] = row[column]
    return rows


def split_rows(rows: list[dict], seed: int, data: str) -> dict[str, list[int]]:
    """Row indices of train / val / test: the ``split`` column, else 80/10/10 by a seeded permutation."""
    if "split" in rows[0]:
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for n, row in enumerate(rows):
            name = SPLIT_NAMES.get(str(row.get("split", "")).strip().lower())
            if name is None:
                raise SpecError(f"SweepSpec.data={data!r} row {n} has split {row.get('split')!r}; expected one of {sorted(SPLIT_NAMES)}.")
            out[name].append(n)
        empty = [k for k, v in out.items() if not v]
        if empty:
            raise SpecError(f"SweepSpec.data={data!r} has no {empty[0]!r} rows in its 'split' column; expected train, validation and test rows.")
        return out
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    a, b = int(len(rows) * FRACTIONS[0]), int(len(rows) * sum(FRACTIONS))
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}


def label_ids(rows: list[dict], config, data: str) -> list[int]:
    """The ``label`` column as class indices of the model (see the module docstring)."""
    if any("label" not in row or row["label"] in (None, "") for row in rows):
        n = next(i for i, row in enumerate(rows) if "label" not in row or row["label"] in (None, ""))
        raise SpecError(f"SweepSpec.data={data!r} row {n} has no 'label'; expected a label on every row for task "
                        "'sequence-classification'.")
    values = [row["label"] for row in rows]
    n_labels = int(config.num_labels)
    if all(isinstance(v, int) or (isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip())) for v in values):
        ids = [int(v) for v in values]
    else:
        names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        default = all(re.fullmatch(r"LABEL_\d+", k) for k in names)
        seen = sorted({str(v) for v in values})
        table = names if names and not default else {name: i for i, name in enumerate(seen)}
        missing = [v for v in seen if v not in table]
        if missing:
            raise SpecError(f"SweepSpec.data={data!r} has label {missing[0]!r}; expected one of the model's labels {sorted(table)} "
                            "(config.json label2id).")
        ids = [table[str(v)] for v in values]
    bad = [i for i in ids if not 0 <= i < n_labels]
    if bad:
        raise SpecError(f"SweepSpec.data={data!r} has label {bad[0]}; expected 0..{n_labels - 1} (the model's num_labels is {n_labels}).")
    return ids


# ---------------------------------------------------------------- model


class Pooled(nn.Module):
    """A transformer encoder with sentence-transformers pooling: (ids, mask) -> (B, hidden)."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    def extra_repr(self) -> str:  # part of the teacher's content hash: outputs differ by these
        return f"pooling={self.pooling!r}, normalize={self.normalize}"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def pooling_of(path: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers directory; ("mean", False) without one."""
    modules = path / "modules.json"
    pooling, normalize = "mean", False
    if modules.is_file():
        entries = json.loads(modules.read_text())
        normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
        for entry in entries:
            if str(entry.get("type", "")).endswith("Pooling"):
                config = json.loads((path / entry.get("path", "") / "config.json").read_text())
                modes = [m for m in POOLING if config.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")]
                if len(modes) != 1:
                    raise SpecError(f"{_where(str(path))} pooling config {config} sets {modes or 'no mode'}; expected exactly one of "
                                    "mean, cls or max pooling.")
                pooling = modes[0]
    return pooling, normalize


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(path: Path, task: str) -> nn.Module:
    """The model in ``path`` for ``task``, in eval mode."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    try:
        if task == "sequence-classification":
            return AutoModelForSequenceClassification.from_pretrained(path).eval()
        try:  # BERT-family encoders carry a pooler the sentence embedding never uses: leave it out
            encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_pretrained(path)
        return Pooled(encoder.eval(), *pooling_of(path)).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(f"{_where(str(path))} cannot be loaded for task {task!r} ({type(exc).__name__}: {str(exc)[:300]}); "
                        "expected a directory written by save_pretrained with config.json and the weights.") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{_where(str(path))} has no tokenizer that loads ({type(exc).__name__}: {str(exc)[:200]}); expected "
                        "the tokenizer's files beside config.json (tokenizer.save_pretrained(PATH)).") from None


def model_limit(path: Path, tokenizer, config) -> int:
    """The longest input the model takes: the smallest of sentence-transformers' ``max_seq_length``,
    the tokenizer's ``model_max_length`` and the config's ``max_position_embeddings`` that are set
    (512 when none is)."""
    limits = []
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file() and "max_seq_length" in (conf := json.loads(sbert.read_text())):
        limits.append(int(conf["max_seq_length"]))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 100_000:
        limits.append(limit)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else 512


def encode(tokenizer, rows: list[dict], max_length: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every row tokenized once, truncated at ``max_length``, padded to the longest."""
    texts = [row["text"] for row in rows]
    pairs = [str(row["text_pair"]) for row in rows] if "text_pair" in rows[0] else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return {name: enc[name].long() for name in names}


def longest_input(tokenizer, rows: list[dict], max_length: int, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """One input of ``max_length`` tokens, the longest the tokenizer lets through: the rows' texts
    joined (repeated if short) and truncated there (text pairs: the pairs joined likewise)."""
    def joined(key: str) -> str:
        text = " ".join(str(row[key]) for row in rows[:2 * max_length])
        return " ".join([text] * (max_length // max(1, len(text.split())) + 1))

    pair = joined("text_pair") if "text_pair" in rows[0] else None
    enc = tokenizer([joined("text")], [pair] if pair else None, truncation=True, max_length=max_length,
                    padding="max_length", return_tensors="pt")
    return tuple(enc[name].long() for name in names)


def input_names(tokenizer, pairs: bool) -> tuple[str, ...]:
    """What the program takes: input_ids and attention_mask; token_type_ids for text pairs only."""
    wanted = ["input_ids", "attention_mask"] + (["token_type_ids"] if pairs else [])
    return tuple(n for n in wanted if n in tokenizer.model_input_names or n == "input_ids")


def by_length(columns: dict[str, torch.Tensor], rows: list[int], labels: torch.Tensor | None) -> list[torch.Tensor]:
    """The split's tensors (inputs, then labels), its rows sorted by length (batches taken in order
    carry little padding)."""
    idx = torch.tensor(rows)
    mask = columns.get("attention_mask")
    lengths = mask[idx].sum(1) if mask is not None else torch.full((len(rows),), columns["input_ids"].shape[1])
    idx = idx[torch.argsort(lengths, stable=True)]
    out = [t[idx] for t in columns.values()]
    if labels is not None:
        out.append(labels[idx])
    return out


# ---------------------------------------------------------------- quality


class Cosine:
    """Mean cosine similarity between a model's embeddings and the teacher's (the split's tensor
    after the ``n`` inputs), in batches of similar length, each cut to its longest row."""

    def __init__(self, n: int) -> None:
        self.n = n

    def embed(self, model: nn.Module, inputs: list[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(inputs[0]), batch_size):
                batch = [t[start:start + batch_size] for t in inputs]
                if len(batch) > 1:  # the attention mask: drop the columns no row uses
                    cut = max(1, int(batch[1].sum(1).max()))
                    batch = [t[:, :cut] for t in batch]
                out.append(model(*batch).float())
        return torch.cat(out)

    def cosines(self, model: nn.Module, split: TensorDataset) -> torch.Tensor:
        emb = self.embed(model, list(split.tensors[:self.n]))
        return nn.functional.cosine_similarity(emb, split.tensors[self.n], dim=-1)

    def __call__(self, model: nn.Module, split: TensorDataset) -> float:
        return float(self.cosines(model, split).mean())


class CosineSpread(Cosine):
    """``cosine_p5`` (5th percentile) and ``cosine_min`` of the cosine to the teacher."""

    def __call__(self, model: nn.Module, split: TensorDataset) -> dict[str, float]:
        cos = self.cosines(model, split)
        return {"cosine_p5": float(torch.quantile(cos, 0.05)), "cosine_min": float(cos.min())}


# ---------------------------------------------------------------- assets


def assets(model: nn.Module, files: dict[str, bytes]) -> dict[str, bytes]:
    """The tokenizer's files and ``hf_program.json`` (the same for every variant)."""
    return files


def tokenizer_files(tokenizer, description: dict) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    files[PROGRAM_FILE] = json.dumps(description, indent=2).encode()
    return files


def name_of(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name).strip("-.") or "hf-model"


# ---------------------------------------------------------------- the workload


def build(path: str, task: str | None, data: str | None, seed: int = 0, cache: BlobCache | None = None,
          max_length: int | None = None) -> Workload:
    """The workload for the model in directory ``path`` (see the module docstring)."""
    where = _where(path)
    if task not in TASKS:
        raise SpecError(f"{where} needs SweepSpec.task (--task); got {task!r}, expected one of {list(TASKS)}.")
    if not data:
        raise SpecError(f"{where} needs SweepSpec.data (--data): a .csv, .tsv, .jsonl or .txt file of the texts to compress it on.")
    root = Path(path)
    if not (root / "config.json").is_file():
        raise SpecError(f"{where} has no config.json; expected a directory written by save_pretrained (config, weights, tokenizer).")
    _quiet_transformers()
    cache = cache or DirCache(home() / "cache")
    tokenizer = load_tokenizer(root)
    model = load_model(root, task)
    config = (model.encoder if isinstance(model, Pooled) else model).config
    limit = model_limit(root, tokenizer, config)
    if max_length is not None and max_length > limit:
        raise SpecError(f"SweepSpec.max_length={max_length} is over the model's limit {limit} ({where}); expected at most {limit}.")
    max_length = max_length or limit
    rows = read_rows(data)
    if task == "sentence-embedding" and Path(data).suffix.lower() != ".txt" and "label" in rows[0]:
        logger.info("%s: task 'sentence-embedding' does not use the 'label' column of %s", where, data)
    if task == "sequence-classification" and Path(data).suffix.lower() == ".txt":
        raise SpecError(f"SweepSpec.data={data!r} is plain text; expected a .csv, .tsv or .jsonl file with a 'label' column "
                        "for task 'sequence-classification'.")
    labels = label_ids(rows, config, data) if task == "sequence-classification" else None
    names = input_names(tokenizer, "text_pair" in rows[0])
    if task == "sentence-embedding" and names[:2] != ("input_ids", "attention_mask"):
        raise SpecError(f"{where} tokenizer gives {list(tokenizer.model_input_names)}; expected input_ids and attention_mask "
                        "for task 'sentence-embedding'.")
    columns = encode(tokenizer, rows, max_length, names)
    parts = split_rows(rows, seed, data)
    targets = None if labels is None else torch.tensor(labels)
    split = {k: by_length(columns, idx, targets) for k, idx in parts.items()}
    length = columns["input_ids"].shape[1]
    test = split["test"]
    median = len(test[0]) // 2
    cut = int(test[1][median].sum()) if "attention_mask" in names else length
    example = tuple(t[median:median + 1, :cut] for t in test[:len(names)])
    description = {"task": task, "inputs": {n: {"dtype": "int64", "shape": ["batch", "sequence"]} for n in names},
                   "max_length": max_length, "pad_id": tokenizer.pad_token_id,
                   "usage": f"enc = AutoTokenizer.from_pretrained(DIR)(texts, padding=True, truncation=True, max_length={max_length}, "
                            "return_tensors='np'); program(*(enc[name] for name in inputs))"}
    common = {"name": name_of(root), "teacher": model, "inputs": names, "example": example,
              "longest": longest_input(tokenizer, rows, max_length, names), "dynamic_dims": (0, 1),
              "max_dims": {0: max(1, PTE_TOKENS_PER_CALL // max_length), 1: max_length}}
    if task == "sequence-classification":
        description["output"] = {"name": "logits", "shape": ["batch", int(config.num_labels)],
                                 "labels": {str(k): v for k, v in (config.id2label or {}).items()}}
        return Workload(**common, train=TensorDataset(*split["train"]), val=TensorDataset(*split["val"]),
                        test=TensorDataset(*test), quality=accuracy, task="classification", label="labels",
                        output="logits", assets=functools.partial(assets, files=tokenizer_files(tokenizer, description)))
    teacher = model
    n = len(names)

    def reference(tensors: list[torch.Tensor]) -> TensorDataset:
        inputs = tuple(tensors[:n])
        return TensorDataset(*inputs, teacher_outputs(teacher, inputs, cache, batch_size=64).outputs)

    ood_rows = ood_text.python_docs(_sentences, exclude=[row["text"] for row in rows])
    ood_columns = encode(tokenizer, [{"text": s} for s in ood_rows], max_length, names)
    ood = by_length(ood_columns, list(range(len(ood_rows))), None)
    with torch.inference_mode():
        dim = int(teacher(*example).shape[-1])
    description["output"] = {"name": "sentence_embedding", "shape": ["batch", dim], "normalized": teacher.normalize,
                             "pooling": teacher.pooling}
    return Workload(**common, train=TensorDataset(*split["train"]), val=reference(split["val"]), test=reference(test),
                    ood={OOD_NAME: reference(ood)}, ood_baselines={OOD_NAME: 1.0}, quality=Cosine(n), quality_name="cosine",
                    task="embedding", extra_metrics=CosineSpread(n),
                    assets=functools.partial(assets, files=tokenizer_files(tokenizer, description)))


def _sentences(text: str) -> list[str]:
    from shrinkflow.workloads.minilm import split_sentences

    return split_sentences(text)
