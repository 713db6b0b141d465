"""Layer-wise distillation for transformer students: hidden states and self-attention relations.

Two losses beyond the output, selected by weights in :class:`shrinkflow.specs.DistillSpec`:

- ``hidden``: TinyBERT's hidden-state matching (Jiao et al., 2020). The output of student layer
  ``i`` is mapped by a learned linear projection (student width -> teacher width, dropped after
  training) onto the output of teacher layer ``layer_map[i]``; mean squared error over the
  tokens that are not padding.
- ``relations``: MiniLMv2's self-attention relations (Wang et al., 2021). The queries, keys and
  values of the student's last layer and of teacher layer ``layer_map[-1]`` are each split into
  ``relation_heads`` relation heads; for each head the scaled dot products of every token with
  every other token are turned into a distribution (softmax over the keys that are not padding),
  and the student's distribution is pulled to the teacher's by KL divergence: Q-Q, K-K and V-V,
  averaged over heads and tokens. The relation head count is independent of the models' own
  attention heads, so a student with fewer heads (or a narrower one) learns from the teacher.

Transformer layers are found without user hooks (:func:`find_blocks`): the longest
``nn.ModuleList`` whose items hold query, key and value projections (Hugging Face BERT, RoBERTa,
DistilBERT, and most encoders that name them ``query``/``key``/``value``, ``q_lin``... or
``q_proj``...). :func:`shallower` builds a student from chosen layers of a model.

The teacher's targets (the hidden states and Q/K/V the losses read) are computed once per
(teacher, data, layer map), in chunks of consecutive training samples cut to the chunk's longest
sample, stored content-addressed in the blob cache, kept in memory while they fit in
``memory_bytes`` and otherwise read back from the store chunk by chunk each epoch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shrinkflow.cache import BlobCache, dumps, loads
from shrinkflow.errors import SpecError
from shrinkflow.train import device

logger = logging.getLogger(__name__)

#: Names of the query, key and value projections inside an attention module, by model family.
QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))
#: Attributes that hold an attention module's head count, by model family.
HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads")
#: Training samples per cached chunk of teacher targets.
CHUNK = 256
#: Teacher targets kept in memory at most (bytes); beyond this they are streamed from the store.
MEMORY_BYTES = 1 << 30
#: The layer-wise terms the default sweep and the search give a transformer's students.
TERMS = {"hidden": 1.0, "relations": 1.0}
#: Bump when what the targets hold changes.
TARGETS_VERSION = "2"  # 2: chunks hold copies of their inputs, not views of the whole split


# ---------------------------------------------------------------- finding the layers


@dataclass(frozen=True)
class Blocks:
    """A model's transformer layers: the list, and in each layer its Q/K/V projections and heads."""

    path: str
    layers: nn.ModuleList
    qkv: tuple[tuple[nn.Linear, nn.Linear, nn.Linear], ...]
    heads: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def width(self) -> int:
        """The width of the layers' output (the residual stream)."""
        return self.qkv[-1][0].in_features


def _attention(layer: nn.Module) -> tuple[nn.Module, tuple[nn.Linear, nn.Linear, nn.Linear]] | None:
    for module in layer.modules():
        for names in QKV_NAMES:
            projs = [getattr(module, n, None) for n in names]
            if all(isinstance(p, nn.Linear) for p in projs):
                return module, tuple(projs)
    return None


def _heads(attention: nn.Module, model: nn.Module) -> int:
    for attr in HEAD_ATTRS:
        if isinstance(value := getattr(attention, attr, None), int) and value > 0:
            return value
    for module in model.modules():  # the model's config, else one head
        if isinstance(value := getattr(getattr(module, "config", None), "num_attention_heads", None), int):
            return value
    return 1


def find_blocks(model: nn.Module) -> Blocks | None:
    """The model's transformer layers (the longest ModuleList whose every item has Q/K/V
    projections), or None if it has none."""
    best: Blocks | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        found = [_attention(layer) for layer in module]
        if any(f is None for f in found) or (best is not None and len(module) <= len(best)):
            continue
        best = Blocks(path, module, tuple(f[1] for f in found), tuple(_heads(f[0], model) for f in found))
    return best


def blocks_of(model: nn.Module, what: str) -> Blocks:
    """:func:`find_blocks`, or a SpecError naming ``what`` (a DistillSpec field) when there are none."""
    blocks = find_blocks(model)
    if blocks is None:
        raise SpecError(f"{what} needs transformer layers (an nn.ModuleList of layers with query/key/value "
                        f"projections); {type(model).__name__} has none: expected a transformer, or a step without it.")
    return blocks


def pick_layers(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layers spread evenly, the last always kept: (i + 1) * n / k - 1 (TinyBERT's
    uniform map; for k = n / 2 every other layer)."""
    return [max(0, math.ceil((i + 1) * n / k) - 1) for i in range(k)]


def shallower(model: nn.Module, depth: float, what: str = "DistillSpec.depth", keep: list[int] | None = None) -> nn.Module:
    """A copy of ``model`` keeping ``round(n * depth)`` of its n transformer layers, weights and
    all (a student initialised from the teacher's layers): the layers ``keep`` names, else
    :func:`pick_layers`."""
    blocks = blocks_of(model, what)
    k = max(1, min(len(blocks), round(len(blocks) * depth)))
    return keep_layers(model, blocks, keep if keep is not None else pick_layers(len(blocks), k))


def keep_layers(model: nn.Module, blocks: Blocks, keep: list[int]) -> nn.Module:
    """A copy of ``model`` with only the transformer layers ``keep`` (indices into ``blocks``)."""
    out = copy.deepcopy(model)
    layers = out.get_submodule(blocks.path)
    kept = nn.ModuleList(layers[i] for i in keep)
    parent, _, name = blocks.path.rpartition(".")
    setattr(out.get_submodule(parent) if parent else out, name, kept)
    for module in out.modules():  # Hugging Face models read their depth from the config
        config = getattr(module, "config", None)
        for attr in ("num_hidden_layers", "n_layers", "num_layers"):
            if isinstance(getattr(config, attr, None), int):
                setattr(config, attr, len(keep))
    for i, layer in enumerate(kept):  # layers that index a cache by their position
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i
    return out


def important_layers(model: nn.Module, depth: float, score: Callable[[nn.Module], float]) -> list[int]:
    """The ``round(n * depth)`` transformer layers whose removal alone costs the most ``score``
    (validation quality, higher is better), in order: n + 1 evaluations, no training."""
    blocks = blocks_of(model, "DistillSpec.layers")
    n = len(blocks)
    k = max(1, min(n, round(n * depth)))
    base = score(model)
    drops = [base - score(keep_layers(model, blocks, [j for j in range(n) if j != i])) for i in range(n)]
    logger.info("layer importance (quality lost without each layer): %s", ", ".join(f"{d:.4f}" for d in drops))
    return sorted(sorted(range(n), key=lambda i: (-drops[i], i))[:k])


def layer_map(spec_map: tuple[int, ...] | None, teacher: Blocks, student: Blocks) -> list[int]:
    """Which teacher layer teaches each student layer: ``spec_map`` checked, or the uniform map."""
    if spec_map is None:
        return pick_layers(len(teacher), len(student))
    if len(spec_map) != len(student) or any(not 0 <= i < len(teacher) for i in spec_map):
        raise SpecError(f"DistillSpec.layer_map={list(spec_map)!r}: expected {len(student)} teacher layer indices "
                        f"(one per student layer), each in 0..{len(teacher) - 1}.")
    return list(spec_map)


def relation_heads(requested: int | None, teacher: Blocks, student: Blocks, t_layer: int) -> int:
    """Relation heads: ``requested``, else the teacher layer's attention heads when they divide
    both models' Q/K/V widths, else the largest count below that which does."""
    tw, sw = teacher.qkv[t_layer][0].out_features, student.qkv[-1][0].out_features
    if requested is not None:
        if tw % requested or sw % requested:
            raise SpecError(f"DistillSpec.relation_heads={requested}: expected a count dividing the teacher's and the "
                            f"student's query widths ({tw} and {sw}).")
        return requested
    return max(r for r in range(1, teacher.heads[t_layer] + 1) if tw % r == 0 and sw % r == 0)


# ---------------------------------------------------------------- the losses


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                proj: nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between ``proj(student)`` (B, L, Ht) and ``teacher`` (B, L, Ht), averaged
    over the features and the tokens where ``mask`` (B, L) is true (all when None)."""
    s = proj(student) if proj is not None else student
    err = (s.float() - teacher.float()).pow(2).mean(-1)  # (B, L)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp(min=1.0)


def _relations(x: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """log-softmax of the scaled self dot products of ``x`` (B, L, W) in ``heads`` heads: (B, R, L, L)."""
    b, n, w = x.shape
    h = x.float().view(b, n, heads, w // heads).transpose(1, 2)  # (B, R, L, d)
    scores = h @ h.transpose(-1, -2) / math.sqrt(w // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher relations || student relations) of one of Q, K or V (B, L, W each, widths may
    differ), in ``heads`` relation heads: summed over keys, averaged over heads and the query
    tokens where ``mask`` (B, L) is true (keys where it is false are left out of both softmaxes)."""
    log_s, log_t = _relations(student, heads, mask), _relations(teacher, heads, mask)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)  # (B, L)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)


# ---------------------------------------------------------------- capturing layer states


class Taps:
    """Forward hooks that keep the outputs of chosen layers and the Q/K/V of chosen layers."""

    def __init__(self, blocks: Blocks, hidden_at: list[int], relations_at: list[int]) -> None:
        self.hidden: dict[int, torch.Tensor] = {}
        self.qkv: dict[int, list[torch.Tensor]] = {}
        self._handles = []
        for i in hidden_at:
            self._handles.append(blocks.layers[i].register_forward_hook(self._keep_hidden(i)))
        for i in relations_at:
            self.qkv[i] = [None, None, None]
            for j, proj in enumerate(blocks.qkv[i]):
                self._handles.append(proj.register_forward_hook(self._keep_qkv(i, j)))

    def _keep_hidden(self, i: int):
        def hook(module, args, out):
            self.hidden[i] = out[0] if isinstance(out, tuple) else out
        return hook

    def _keep_qkv(self, i: int, j: int):
        def hook(module, args, out):
            self.qkv[i][j] = out
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pad_id(model: nn.Module) -> int:
    """The padding token id from a Hugging Face config inside ``model`` (0 when none says)."""
    for module in model.modules():
        if isinstance(value := getattr(getattr(module, "config", None), "pad_token_id", None), int):
            return value
    return 0


def token_mask(inputs: tuple[torch.Tensor, ...], names: tuple[str, ...], pad: int) -> torch.Tensor | None:
    """Which tokens are real (B, L): the ``attention_mask`` input where the model takes one, else
    token ids (an integer first input of 2 dims) that are not ``pad``; None otherwise."""
    if "attention_mask" in names:
        return inputs[names.index("attention_mask")] != 0
    if inputs and inputs[0].ndim == 2 and not inputs[0].is_floating_point():
        return inputs[0] != pad
    return None


def trim(inputs: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Cut the trailing columns that are padding in every row from each (B, L, ...) input."""
    if mask is None or mask.ndim != 2:
        return inputs, mask
    cols = mask.any(0).nonzero()
    n = int(cols.max()) + 1 if len(cols) else 1
    if n == mask.shape[1]:
        return inputs, mask
    length = mask.shape[1]
    return tuple(t[:, :n] if t.ndim >= 2 and t.shape[1] == length else t for t in inputs), mask[:, :n]


# ---------------------------------------------------------------- cached teacher targets


@dataclass(frozen=True)
class Plan:
    """What the student learns from: teacher layers for hidden states, the relation layer pair."""

    hidden: tuple[int, ...]  # teacher layer per student layer (empty: no hidden-state loss)
    relation_teacher: int | None  # teacher layer whose relations the student's last layer learns
    heads: int

    def ident(self) -> dict:
        return {"hidden": list(self.hidden), "relation": self.relation_teacher, "chunk": CHUNK, "v": TARGETS_VERSION}


class TeacherTargets:
    """The teacher's layer states on the training inputs, chunk by chunk (see the module docstring)."""

    def __init__(self, teacher: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...], plan: Plan,
                 teacher_key: str, cache: BlobCache | None, memory_bytes: int = MEMORY_BYTES) -> None:
        self.teacher, self.inputs, self.names, self.plan, self.cache = teacher, inputs, names, plan, cache
        self.blocks = blocks_of(teacher, "DistillSpec.hidden/relations")
        self.pad = pad_id(teacher)
        ident = json.dumps({"teacher": teacher_key, **plan.ident()}, sort_keys=True)
        self.key = hashlib.sha256(ident.encode()).hexdigest()[:32]
        self.n = len(inputs[0])
        self.chunks = (self.n + CHUNK - 1) // CHUNK
        self.memory_bytes = memory_bytes
        self.forward_samples = 0  # samples the teacher ran on here (0: every chunk came from the store)
        self._held: dict[int, dict] = {}
        self._held_bytes = 0

    def steps(self, batch_size: int) -> int:
        """Batches in an epoch over every chunk."""
        return sum(-(-len(self.rows(i)) // batch_size) for i in range(self.chunks))

    def release(self) -> None:
        """The teacher back on the CPU (it ran where training runs)."""
        self.teacher.to("cpu")

    def rows(self, i: int) -> range:
        return range(i * CHUNK, min(self.n, (i + 1) * CHUNK))

    def chunk(self, i: int) -> dict:
        """Chunk ``i``: ``inputs`` cut to its longest sample, ``mask``, ``hidden`` (layers, B, L, H)
        and ``qkv`` (3, B, L, W) in float16 (absent when the plan has none)."""
        if i in self._held:
            return self._held[i]
        blob_key = f"teacher-layers/{self.key}/{i}.pt"
        blob = self.cache.get(blob_key) if self.cache is not None else None
        if blob is not None:
            out = loads(blob, f"teacher targets {blob_key!r}")
        else:
            out = self._compute(i)
            if self.cache is not None:
                self.cache.put(blob_key, dumps(out))
        size = sum(t.numel() * t.element_size() for t in _tensors(out))
        if self.cache is None or self._held_bytes + size <= self.memory_bytes:
            self._held[i] = out
            self._held_bytes += size
        return out

    def _compute(self, i: int) -> dict:
        rows = self.rows(i)
        xs = tuple(t[rows.start:rows.stop] for t in self.inputs)
        mask = token_mask(xs, self.names, self.pad)
        xs, mask = trim(xs, mask)
        plan = self.plan
        relation_at = [plan.relation_teacher] if plan.relation_teacher is not None else []
        dev = device()
        with torch.inference_mode(), Taps(self.blocks, sorted(set(plan.hidden)), relation_at) as taps:
            self.teacher.to(dev).eval()(*(t.to(dev) for t in xs))
        taps.hidden = {k: v.cpu() for k, v in taps.hidden.items()}
        taps.qkv = {k: [t.cpu() for t in v] for k, v in taps.qkv.items()}
        self.forward_samples += len(rows)
        # Copies, not views: a view of the training inputs would be stored with all of them (torch.save keeps the
        # whole storage; 73 MB per chunk for MiniLM's split, four times the chunk's own states).
        out: dict = {"inputs": tuple(t.clone() for t in xs), "mask": mask.clone() if mask is not None else None}
        length = next(iter(taps.hidden.values())).shape[1] if taps.hidden else None
        if plan.hidden:
            out["hidden"] = torch.stack([taps.hidden[t] for t in plan.hidden]).half()
        if relation_at:
            out["qkv"] = torch.stack(taps.qkv[plan.relation_teacher]).half()
            length = out["qkv"].shape[2]
        if length is not None and mask is not None and length < mask.shape[1]:  # the model trimmed padding itself
            out["mask"] = mask[:, :length].clone()
        return out


def _tensors(chunk: dict) -> Iterator[torch.Tensor]:
    for value in chunk.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, tuple):
            yield from value


# ---------------------------------------------------------------- training


class Projections(nn.Module):
    """Student width -> teacher width, one per student layer (identity-initialised when equal)."""

    def __init__(self, n: int, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(n))
        if student_width == teacher_width:
            with torch.no_grad():
                for m in self.maps:
                    m.weight.copy_(torch.eye(teacher_width))


@dataclass
class Objective:
    """The layer-wise part of a distillation loss, for one student and its teacher targets."""

    plan: Plan
    targets: TeacherTargets
    student_blocks: Blocks
    hidden_weight: float
    relations_weight: float
    projections: Projections | None

    def taps(self) -> Taps:
        hidden_at = list(range(len(self.student_blocks))) if self.plan.hidden else []
        relation_at = [len(self.student_blocks) - 1] if self.plan.relation_teacher is not None else []
        return Taps(self.student_blocks, hidden_at, relation_at)

    def loss(self, taps: Taps, part: dict) -> torch.Tensor:
        """The weighted hidden-state and relation losses of a batch (``part``: :func:`rows_of` a chunk)."""
        total = torch.zeros((), device=part["device"])
        mask = part["mask"]
        if self.plan.hidden:
            for i in range(len(self.student_blocks)):
                s = taps.hidden[i]
                n = s.shape[1]
                total = total + self.hidden_weight * hidden_loss(
                    s, part["hidden"][i, :, :n], mask[:, :n] if mask is not None else None,
                    self.projections.maps[i]) / len(self.student_blocks)
        if self.plan.relation_teacher is not None:
            s_qkv = taps.qkv[len(self.student_blocks) - 1]
            n = s_qkv[0].shape[1]
            m = mask[:, :n] if mask is not None else None
            for j in range(3):
                total = total + self.relations_weight * relation_loss(s_qkv[j], part["qkv"][j, :, :n], self.plan.heads, m) / 3
        return total


def rows_of(chunk: dict, rows: torch.Tensor, dev: torch.device) -> dict:
    """A batch of a chunk on ``dev``: its ``inputs``, ``mask`` and teacher states at ``rows``."""
    part = {"device": dev, "inputs": tuple(t[rows].to(dev) for t in chunk["inputs"]),
            "mask": chunk["mask"][rows].to(dev) if chunk["mask"] is not None else None}
    for name in ("hidden", "qkv"):
        if name in chunk:
            part[name] = chunk[name][:, rows].to(dev)
    return part


def batches(targets: TeacherTargets, batch_size: int, epoch_samples: int | None, gen: torch.Generator
            ) -> Iterator[tuple[int, torch.Tensor]]:
    """(chunk index, rows within it) for one epoch: chunks in random order, rows shuffled within
    each, until ``epoch_samples`` samples (all when None)."""
    left = epoch_samples or targets.n
    for i in torch.randperm(targets.chunks, generator=gen).tolist():
        rows = torch.randperm(len(targets.rows(i)), generator=gen)
        for part in rows.split(batch_size):
            if left <= 0:
                return
            part = part[:left]
            left -= len(part)
            yield i, part


def build_objective(teacher: nn.Module, student: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...],
                    spec, teacher_key: str, cache: BlobCache | None) -> Objective:
    """The plan and teacher targets for ``spec`` (a DistillSpec with ``hidden`` or ``relations``)."""
    t_blocks = blocks_of(teacher, "DistillSpec.hidden/relations (the teacher)")
    s_blocks = blocks_of(student, "DistillSpec.hidden/relations (the student)")
    mapping = layer_map(spec.layer_map, t_blocks, s_blocks)
    rel_t = mapping[-1] if spec.relations > 0 else None
    heads = relation_heads(spec.relation_heads, t_blocks, s_blocks, rel_t) if rel_t is not None else 0
    plan = Plan(tuple(mapping) if spec.hidden > 0 else (), rel_t, heads)
    targets = TeacherTargets(teacher, inputs, names, plan, teacher_key, cache)
    projections = Projections(len(s_blocks), s_blocks.width, t_blocks.width) if spec.hidden > 0 else None
    logger.info("layer-wise distillation: student layers %d <- teacher layers %s; relations from teacher layer %s in %d heads",
                len(s_blocks), mapping, rel_t, heads)
    return Objective(plan, targets, s_blocks, spec.hidden, spec.relations, projections)

