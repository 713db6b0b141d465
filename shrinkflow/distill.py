"""Knowledge distillation: Hinton KD for classifiers, output/embedding distillation for encoders,
plus the layer-wise terms of :mod:`shrinkflow.layerwise` (hidden states, attention relations)
for transformer students.

Teacher outputs are computed once per (teacher, data) pair, cached under a content hash of
both, and reused by every student and every fine-tuning step; the teacher never runs inside a
student's training loop.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow.cache import BlobCache, DirCache, dumps
from shrinkflow.cache import loads as blob_loads
from shrinkflow.layerwise import Objective, batches, rows_of
from shrinkflow.specs import DistillSpec
from shrinkflow.train import TrainConfig, device, fit, train_loop

logger = logging.getLogger(__name__)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al. (2015): alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE(labels)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    log_target=True, reduction="batchmean") * (t * t)
    if labels is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student, labels)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """MSE or (1 - cosine) between student and teacher hidden states or pooled embeddings."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def _as_tuple(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def content_hash(module: nn.Module, data: torch.Tensor | tuple[torch.Tensor, ...]) -> str:
    """sha256 over the module's structure (its printed form: classes, sizes and each module's
    ``extra_repr``, so settings outside the weights such as a pooling mode count), its state
    (names, dtypes, shapes, values) and the input tensor(s)."""
    h = hashlib.sha256()
    h.update(repr(module).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for t in _as_tuple(data):  # read in place: a split mapped from a file is not copied into memory
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass(frozen=True)
class TeacherOutputs:
    key: str
    outputs: torch.Tensor
    forward_samples: int  # samples the teacher ran on to produce this (0 when read from the cache)


def _forward(teacher: nn.Module, inputs: tuple[torch.Tensor, ...], batch_size: int,
             trim: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Teacher inference; DataParallel over every visible GPU when there is more than one.
    ``trim`` cuts each batch of a one-input model before it runs (padding columns no row of the
    batch uses, say)."""
    dev = device()
    runner: nn.Module = teacher.to(dev).eval()
    if torch.cuda.device_count() > 1:
        runner = nn.DataParallel(runner)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for start in range(0, len(inputs[0]), batch_size):
            batch = tuple(t[start:start + batch_size] for t in inputs)
            if trim is not None and len(batch) == 1:
                batch = (trim(batch[0]),)
            chunk = runner(*(t.to(dev) for t in batch)).float().cpu()
            if out is None:  # one buffer for every output: small outputs kept between a batch's freed
                # intermediates would pin those holes in the heap, and it would grow with the data
                out = torch.empty((len(inputs[0]), *chunk.shape[1:]))
            out[start:start + len(chunk)] = chunk
    teacher.to("cpu")
    return out


def teacher_outputs(teacher: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], cache: BlobCache | Path | None = None,
                    batch_size: int = 256, key: str | None = None,
                    trim: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TeacherOutputs:
    """The teacher's outputs on ``inputs`` (a tensor, or one per model input), from the
    content-addressed cache when present.
    ``key``, when given, is ``content_hash(teacher, inputs)`` computed already; ``trim`` cuts
    each batch before the teacher runs it, and must not change the outputs (padding only)."""
    key = key or content_hash(teacher, inputs)
    cache = DirCache(cache) if isinstance(cache, Path) else cache
    blob_key = f"teacher-outputs/{key}.pt"
    if cache is not None and (blob := cache.get(blob_key)) is not None:
        logger.info("teacher outputs %s: cache hit", key[:12])
        return TeacherOutputs(key, blob_loads(blob, f"teacher outputs {blob_key!r}"), 0)
    out = _forward(teacher, _as_tuple(inputs), batch_size, trim)
    logger.info("teacher outputs %s: computed, %d forward samples", key[:12], len(out))
    if cache is not None:
        cache.put(blob_key, dumps(out))
    return TeacherOutputs(key, out, len(out))


def output_loss(spec: DistillSpec, has_labels: bool):
    """``loss(student_out, teacher_out, labels)`` of the spec: Hinton KD, MSE or cosine on outputs."""
    if spec.loss == "kd":
        return lambda out, t, y: kd_loss(out, t, y if has_labels else None, spec.temperature, spec.alpha)
    return lambda out, t, y: feature_loss(out, t, spec.loss)


def distill(student: nn.Module, teacher_out: torch.Tensor, train: TensorDataset, spec: DistillSpec,
            validate, seed: int = 0, inputs: int = 1, layerwise: Objective | None = None) -> nn.Module:
    """Train ``student`` on the cached teacher outputs (and labels, if ``train`` has them after
    its first ``inputs`` tensors, the model's inputs); with ``layerwise`` (see
    :mod:`shrinkflow.layerwise`), also on the teacher's layer states, batch by batch from its chunks."""
    xs, rest = train.tensors[:inputs], train.tensors[inputs:]
    labels = rest[0] if rest else None
    out_loss = output_loss(spec, labels is not None)
    cfg = TrainConfig(epochs=spec.epochs, lr=spec.lr, scheduler=spec.scheduler, patience=spec.patience,
                      samples_per_epoch=spec.samples_per_epoch)
    if layerwise is None:
        data = TensorDataset(*xs, *([labels] if labels is not None else []), teacher_out)
        student, score = fit(student, data, lambda out, t: out_loss(out, t[-1], t[0]), cfg, validate, seed=seed, inputs=inputs)
    else:
        student, score = _distill_layerwise(student, teacher_out, labels, layerwise, out_loss, cfg, validate, seed)
    logger.info("distilled student: validation %.4f", score)
    return student


def _distill_layerwise(student: nn.Module, teacher_out: torch.Tensor, labels: torch.Tensor | None, objective: Objective,
                       out_loss, cfg: TrainConfig, validate, seed: int) -> tuple[nn.Module, float]:
    targets = objective.targets
    current: dict[int, dict] = {}  # the chunk being trained on: an epoch takes all its batches in a row

    def step_loss(batch, dev):
        i, rows = batch
        if i not in current:  # read once per chunk and epoch, not once per batch, when streamed
            current.clear()
            current[i] = targets.chunk(i)
        part = rows_of(current[i], rows, dev)
        idx = rows + targets.rows(i).start
        y = labels[idx].to(dev) if labels is not None else None
        loss = out_loss(student(*part["inputs"]), teacher_out[idx].to(dev), y)
        return loss + objective.loss(taps, part)

    steps = targets.steps(cfg.batch_size) if cfg.samples_per_epoch is None else -(-cfg.samples_per_epoch // cfg.batch_size) + targets.chunks
    with objective.taps() as taps:
        try:
            return train_loop(student, lambda gen: batches(targets, cfg.batch_size, cfg.samples_per_epoch, gen), step_loss,
                              cfg, validate, seed, extra=objective.projections, steps_per_epoch=steps)
        finally:
            targets.release()
