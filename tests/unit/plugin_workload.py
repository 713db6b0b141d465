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
    """The built-in minilm workload on :func:`minilm_small_teacher`, its training split cut to every
    20th sentence (1,000).

    A sweep runs the teacher over the training split once (the distillation targets); recipes that
    train nothing (vocabulary cut, quantization) never read those outputs, so a test of them skips
    19,000 teacher passes. The vocabulary step still counts tokens over the full split, and the
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
