"""Training loops shared by fine-tuning and distillation: schedulers and early stopping."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
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


def fit(
    model: nn.Module,
    train: TensorDataset,
    loss_fn: LossFn,
    cfg: TrainConfig,
    validate: Callable[[nn.Module], float],
    seed: int = 0,
    inputs: int = 1,
) -> tuple[nn.Module, float]:
    """Train ``model`` in place; keep the weights of the best validation epoch (early stopping).

    ``train`` yields (*inputs, *targets), its first ``inputs`` tensors the model's inputs;
    ``loss_fn(outputs, targets)`` returns a scalar.
    Returns the model with its best weights and that validation score.
    """
    best_score, best_state, stale = validate(model), copy.deepcopy(model.state_dict()), 0
    if cfg.epochs == 0:
        return model, best_score
    gen = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(train, num_samples=cfg.samples_per_epoch, generator=gen)
    loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(cfg.scheduler, opt, cfg.epochs, len(loader))
    for epoch in range(cfg.epochs):
        model.train()
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(*batch[:inputs]), tuple(batch[inputs:])).backward()
            opt.step()
            sched.step()
        model.eval()
        score = validate(model)
        logger.debug("epoch %d: validation %.4f", epoch, score)
        if score > best_score:
            best_score, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                logger.debug("early stop after epoch %d", epoch)
                break
    model.load_state_dict(best_state)
    return model.eval(), best_score
