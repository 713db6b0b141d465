"""A workload's data and how its model is called: several inputs, keyword inputs, any data set.

Every split is held as a ``TensorDataset`` laid out ``(*inputs, labels)``: the model's inputs
first, in the order it takes them, then (classifiers) the labels. :func:`as_split` brings any
map-style or iterable ``Dataset``, or a ``DataLoader``, whose items or batches are tuples or dicts
of tensors, to that layout, checking as it goes; it reads the data once, in order (the steps
train, calibrate and evaluate on it many times over). Up to :data:`SPILL_BYTES` it is kept in
memory; a larger one is written, batch by batch as it is read, to files that are then mapped
(``numpy.memmap``): its tensors are backed by the page cache, which the kernel fills as batches
are read and drops under memory pressure, so a data set larger than memory works. The files
are unlinked once mapped (the mapping keeps them until the tensors are gone).

A model whose ``forward`` takes keyword tensors (``model(input_ids=..., attention_mask=...)``)
or returns something other than a tensor (a Hugging Face ``ModelOutput``, a tuple) is wrapped
in :class:`Call`, which takes the inputs positionally and returns one tensor: every step,
runtime and measurement sees a model ``model(*inputs) -> Tensor``, and the exported program
takes the inputs in that order.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from shrinkflow.errors import SpecError

logger = logging.getLogger(__name__)

#: How many samples :func:`as_split` reads per batch from a Dataset it is given unbatched.
READ_BATCH = 256


def memory_limit() -> int:
    """Bytes this process may use: its cgroup's limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``) where one is set, else the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return physical
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):
            files = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        for file in files:
            try:
                value = file.read_text().strip()
            except OSError:
                continue
            if value.isdigit():
                return min(physical, int(value))
    return physical


#: Bytes of a split held in memory while it is read; beyond them it goes to mapped files: a
#: quarter of :func:`memory_limit`, at most 1 GiB (``SHRINKFLOW_SPILL_MB`` sets it). The files go
#: to ``SHRINKFLOW_SPILL_DIR``, default ``$SHRINKFLOW_HOME/spill`` (a disk, not a tmpfs ``/tmp``,
#: whose pages would count as memory).
SPILL_BYTES = int(float(os.environ["SHRINKFLOW_SPILL_MB"]) * 2**20) if os.environ.get("SHRINKFLOW_SPILL_MB") \
    else min(2**30, memory_limit() // 4)


def spill_dir() -> Path:
    folder = Path(os.environ.get("SHRINKFLOW_SPILL_DIR") or Path(os.environ.get("SHRINKFLOW_HOME", ".shrinkflow")) / "spill")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
#: Output fields taken from a Hugging Face ``ModelOutput`` (or a dict) when none is named, by task.
OUTPUT_FIELDS = {"classification": ("logits",), "embedding": ("sentence_embedding", "embeddings", "pooler_output")}

Inputs = int | tuple[str, ...]


def input_count(inputs: Inputs) -> int:
    return inputs if isinstance(inputs, int) else len(inputs)


def _row(batch, inputs: Inputs, label: str, where: str) -> list[torch.Tensor]:
    """One batch as ``[*inputs, labels?]``."""
    if isinstance(batch, Mapping):
        if isinstance(inputs, int):
            raise SpecError(f"{where} yields dict batches with keys {sorted(batch)}; expected the Workload field "
                            "'inputs' to name the keys the model takes, e.g. inputs=('input_ids', 'attention_mask').")
        missing = [k for k in inputs if k not in batch]
        if missing:
            raise SpecError(f"{where} batch has no key {missing[0]!r} (keys: {sorted(batch)}); expected every name "
                            f"in the Workload field 'inputs' {list(inputs)!r}.")
        row = [batch[k] for k in inputs] + ([batch[label]] if label in batch else [])
    elif isinstance(batch, torch.Tensor):
        row = [batch]
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        row = list(batch)[:input_count(inputs) + 1]  # the inputs, then the labels; further columns are not read
    else:
        raise SpecError(f"{where} yields {type(batch).__name__!r}; expected a tensor, or a tuple or dict of tensors.")
    bad = [type(t).__name__ for t in row if not isinstance(t, torch.Tensor)]
    if bad:
        raise SpecError(f"{where} yields a {bad[0]!r} among its tensors; expected tensors only (tokenize text first).")
    if len(row) < input_count(inputs):
        raise SpecError(f"{where} yields {len(row)} tensor(s) per batch; expected at least the "
                        f"{input_count(inputs)} model input(s) of the Workload field 'inputs'.")
    return row


def _batches(data, where: str) -> DataLoader:
    if isinstance(data, DataLoader):  # batch_size=None: the data set yields whole batches itself
        if isinstance(data.sampler, RandomSampler):  # each worker reads the split again: it must read the same
            raise SpecError(f"{where} is a DataLoader with shuffle=True; expected shuffle=False (a split is read once, "
                            "in order, by every worker; training shuffles its own batches).")
        return data
    if isinstance(data, (Dataset, list, tuple)):
        return DataLoader(data, batch_size=READ_BATCH, shuffle=False)
    raise SpecError(f"{where} is {type(data).__name__!r}; expected a torch Dataset (map-style or iterable), a DataLoader "
                    "or a list of samples.")


def _read(loader: DataLoader, where: str):
    """The loader's batches; a collation failure (samples of different shapes) as a SpecError."""
    batches = iter(loader)
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            raise SpecError(f"{where} cannot be read or batched (RuntimeError: {str(exc)[:200]}); expected samples of one "
                            "shape (pad every sample to one length).") from None


def as_split(data, inputs: Inputs = 1, label: str = "labels", where: str = "split") -> TensorDataset:
    """``data`` as a TensorDataset laid out ``(*inputs, labels?)``: see the module docstring.

    A TensorDataset is taken as it is (its layout is already that). Batches must agree in the
    number of tensors and in every dimension after the first; text padded per batch to different
    lengths is refused with the shapes seen (pad to one length).
    """
    if isinstance(data, TensorDataset):
        if len(data.tensors) < input_count(inputs):
            raise SpecError(f"{where} holds {len(data.tensors)} tensor(s); expected at least the "
                            f"{input_count(inputs)} model input(s) of the Workload field 'inputs'.")
        return data
    columns: list[Column] = []
    held = 0
    for i, batch in enumerate(_read(_batches(data, where), where)):
        row = _row(batch, inputs, label, where)
        if not columns:
            columns = [Column() for _ in row]
        if len(row) != len(columns):
            raise SpecError(f"{where} batch {i} has {len(row)} tensors; expected {len(columns)} like batch 0.")
        for j, (column, t) in enumerate(zip(columns, row, strict=True)):
            t = t.detach().cpu() if t.ndim else t.detach().cpu().reshape(1)
            if column.shape is not None and (t.shape[1:] != column.shape or t.dtype != column.dtype):
                raise SpecError(f"{where} batch {i} tensor {j} has shape {tuple(t.shape)} ({t.dtype}); expected "
                                f"(batch, {', '.join(map(str, column.shape))}) ({column.dtype}) like batch 0 "
                                "(pad every sample to one length).")
            column.add(t)
            held += t.numel() * t.element_size()
        if held > SPILL_BYTES and not columns[0].spilled:
            folder = Path(tempfile.mkdtemp(prefix="shrinkflow-split-", dir=spill_dir()))
            logger.info("%s: over %d MB read, the rest goes to mapped files in %s", where, SPILL_BYTES >> 20, folder)
            for j, column in enumerate(columns):
                column.spill(folder / f"{j}.bin")
    if not columns:
        raise SpecError(f"{where} yielded no batches; expected a non-empty data set.")
    try:
        return TensorDataset(*(column.tensor() for column in columns))
    finally:
        if columns[0].spilled:
            shutil.rmtree(columns[0].path.parent, ignore_errors=True)  # mapped already: the files live on unnamed


class Column:
    """One tensor of a split as it is read: batches in memory, or appended to a file once spilled."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.shape: torch.Size | None = None
        self.dtype: torch.dtype | None = None
        self.rows = 0
        self.path: Path | None = None
        self.file = None

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def add(self, t: torch.Tensor) -> None:
        self.shape, self.dtype = t.shape[1:], t.dtype
        self.rows += len(t)
        if self.file is not None:
            self.file.write(_raw(t))
        else:
            self.parts.append(t)

    def spill(self, path: Path) -> None:
        self.path, self.file = path, path.open("wb")
        for t in self.parts:
            self.file.write(_raw(t))
        self.parts = []

    def tensor(self) -> torch.Tensor:
        if self.file is None:
            return torch.cat(self.parts)
        self.file.close()
        raw = np.memmap(self.path, dtype=np.uint8, mode="c")  # copy-on-write: writable, pages from the file
        return torch.from_numpy(raw).view(self.dtype).reshape(self.rows, *self.shape)


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def choose_output(out, task: str) -> str | int | None:
    """Which part of a model's output is the prediction: None for a tensor, a field name for a
    ``ModelOutput`` or dict (see :data:`OUTPUT_FIELDS`), 0 for a tuple (Hugging Face's order)."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, Mapping):
        found = [k for k in OUTPUT_FIELDS.get(task, ()) if out.get(k) is not None]
        if found:
            return found[0]
        raise SpecError(f"The model returns {type(out).__name__} with fields {sorted(out)}; expected the Workload field "
                        "'output' to name the one that is the prediction (the logits, or the embedding).")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return 0
    raise SpecError(f"The model returns {type(out).__name__!r}; expected a tensor, a tuple starting with one, or a "
                    "Hugging Face output object (set the Workload field 'output').")


def _pick(out, output: str | int | None) -> torch.Tensor:
    if output is None or isinstance(out, torch.Tensor):  # a student may return the tensor itself
        return out
    if isinstance(output, int) or isinstance(out, Mapping):
        return out[output]
    return getattr(out, output)


class Call(nn.Module):
    """``model`` called with positional tensors, given to it by keyword (``names``) or in order,
    its ``output`` field taken (None: the output is already a tensor)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...] | None = None, output: str | int | None = None):
        super().__init__()
        self.model, self.names, self.output = model, tuple(names) if names else None, output

    def extra_repr(self) -> str:  # part of a content hash: the output taken changes what the model returns
        return f"names={self.names!r}, output={self.output!r}"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs, strict=True))) if self.names else self.model(*inputs)
        return _pick(out, self.output)


def wrap(model: nn.Module, inputs: Inputs, output: str | int | None) -> nn.Module:
    """``model`` as ``model(*inputs) -> Tensor``: itself when it is that already, else in a
    :class:`Call` (one already wrapped takes ``output``)."""
    if isinstance(model, Call):
        model.output = output
        return model
    if isinstance(inputs, int) and output is None:
        return model
    return Call(model, None if isinstance(inputs, int) else inputs, output)


class Students:
    """A workload's student factory, its students wrapped like its teacher (picklable)."""

    def __init__(self, factory, inputs: Inputs, output: str | int | None):
        self.factory, self.inputs, self.output = factory, inputs, output

    def __call__(self, width: float, depth: float) -> nn.Module:
        return wrap(self.factory(width, depth), self.inputs, self.output)
