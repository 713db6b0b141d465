"""Training loops shared by fine-tuning and distillation: schedulers and early stopping."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    scheduler: str
    patience: int
    batch_size: int = 64
    weight_decay: float = 1e-4
    samples_per_epoch: int | None = None  # None: every sample once per epoch


def make_scheduler(name: str, opt: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
    """A per-step LR scheduler: constant, step (x0.1 at 1/2 and 3/4), cosine, or one-cycle."""
    total = max(1, epochs * steps_per_epoch)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[total // 2, (3 * total) // 4], gamma=0.1)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=total)
    from shrinkflow.errors import SpecError

    raise SpecError(f"Unknown scheduler {name!r} for field 'scheduler'; expected one of ['constant', 'cosine', 'onecycle', 'step'].")


def device() -> torch.device:
    """Where training runs: the first GPU when one is visible, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def to(batch, dev: torch.device):
    """``batch`` (a tensor, or a tuple of them) on ``dev``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dev, non_blocking=True)
    return tuple(to(t, dev) for t in batch)


def train_loop(
    model: nn.Module,
    epoch_batches: Callable[[torch.Generator], Iterable],
    step_loss: Callable[[object, torch.device], torch.Tensor],
    cfg: TrainConfig,
    validate: Callable[[nn.Module], float],
    seed: int = 0,
    extra: nn.Module | None = None,
    steps_per_epoch: int = 1,
) -> tuple[nn.Module, float]:
    """Train ``model`` (and ``extra``, trained beside it and not kept: projections, say) in place
    on the GPU when one is visible, on the CPU otherwise; keep the weights of the best validation
    epoch (early stopping). ``epoch_batches(generator)`` yields one epoch's batches and
    ``step_loss(batch, device)`` returns a batch's scalar loss. Validation runs on the CPU, where
    the workload's data is. Returns the model (on the CPU) with its best weights and that score."""
    best_score, best_state, stale = validate(model), copy.deepcopy(model.state_dict()), 0
    if cfg.epochs == 0:
        return model, best_score
    gen = torch.Generator().manual_seed(seed)
    dev = device()
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:
        extra.to(dev)
        params += [p for p in extra.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(cfg.scheduler, opt, cfg.epochs, steps_per_epoch)
    total = max(1, cfg.epochs * steps_per_epoch)
    try:
        for epoch in range(cfg.epochs):
            model.train()
            for batch in epoch_batches(gen):
                opt.zero_grad(set_to_none=True)
                step_loss(batch, dev).backward()
                opt.step()
                if sched.last_epoch < total:  # a schedule ends after its planned steps
                    sched.step()
            model.eval().to("cpu")
            score = validate(model)
            model.to(dev)
            logger.debug("epoch %d: validation %.4f", epoch, score)
            if score > best_score:
                best_score, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    logger.debug("early stop after epoch %d", epoch)
                    break
    finally:
        model.to("cpu")
        if extra is not None:
            extra.to("cpu")
    model.load_state_dict(best_state)
    return model.eval(), best_score


def fit(
    model: nn.Module,
    train: TensorDataset,
    loss_fn: LossFn,
    cfg: TrainConfig,
    validate: Callable[[nn.Module], float],
    seed: int = 0,
    inputs: int = 1,
) -> tuple[nn.Module, float]:
    """Train ``model`` in place on ``train`` (see :func:`train_loop`).

    ``train`` yields (*inputs, *targets), its first ``inputs`` tensors the model's inputs;
    ``loss_fn(outputs, targets)`` returns a scalar.
    Returns the model with its best weights and that validation score.
    """
    def epoch(gen: torch.Generator):
        sampler = torch.utils.data.RandomSampler(train, num_samples=cfg.samples_per_epoch, generator=gen)
        return DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, generator=gen)

    def step_loss(batch, dev):
        batch = to(tuple(batch), dev)
        return loss_fn(model(*batch[:inputs]), tuple(batch[inputs:]))

    steps = -(-(cfg.samples_per_epoch or len(train)) // cfg.batch_size)
    return train_loop(model, epoch, step_loss, cfg, validate, seed, steps_per_epoch=steps)
