"""The built-in ``digits`` workload: a small CNN on scikit-learn's 8x8 handwritten digits.

The 1,797 images ship inside scikit-learn, so nothing is downloaded. The teacher (about 227k
parameters) is trained deterministically on first use and cached under the shrinkflow home.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shrinkflow.cache import BlobCache, DirCache, dumps, loads
from shrinkflow.measure import threads
from shrinkflow.specs import DistillSpec, FinetuneSpec, PruneSpec, QuantSpec, Recipe
from shrinkflow.train import TrainConfig, fit
from shrinkflow.workloads import Workload, accuracy, home

logger = logging.getLogger(__name__)

#: The cached teacher's version: raised when its architecture or its training changes (2: trained on
#: one thread, so the same seed gives the same teacher whatever the host's core count).
ARCH_VERSION = 2
#: Intra-op threads for training the teacher: a float reduction's order follows the thread count.
TEACHER_THREADS = 1
BASE_CHANNELS = (32, 64, 128)
BASE_HIDDEN = 256


def _scaled(n: int, width: float) -> int:
    return max(4, int(round(n * width)))


class DigitsCNN(nn.Module):
    """conv blocks (the 2nd and 3rd halve the 8x8 map) -> 2x2 -> MLP head. Input (B, 1, 8, 8)."""

    def __init__(self, width: float = 1.0, depth: float = 1.0) -> None:
        super().__init__()
        n_blocks = max(1, min(3, round(3 * depth)))
        chans = [_scaled(c, width) for c in BASE_CHANNELS[:n_blocks]]
        blocks, c_in = [], 1
        for i, c in enumerate(chans):
            layers = [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i >= 1 or n_blocks == 1:
                layers.append(nn.MaxPool2d(2))  # (B, c, 8, 8) -> (B, c, 4, 4) -> (B, c, 2, 2)
            blocks.append(nn.Sequential(*layers))
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(2)  # (B, c, 2, 2) whatever the depth
        hidden = _scaled(BASE_HIDDEN, width)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 4, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits: (1797, 8, 8) images with values 0..16, and their labels.

    Read from the CSV file sklearn ships, as ``sklearn.datasets.load_digits`` reads it, without
    importing sklearn.datasets (about 2 s of scipy imports in every process that runs a variant).
    """
    import gzip
    import importlib.util

    import numpy as np

    found = importlib.util.find_spec("sklearn")
    path = Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if found else None
    if path is None or not path.is_file():
        raise FileNotFoundError("sklearn's digits data (sklearn/datasets/data/digits.csv.gz) is missing; "
                                "expected scikit-learn installed (pip install scikit-learn).")
    with gzip.open(path) as f:
        raw = np.loadtxt(f, delimiter=",")
    return torch.tensor(raw[:, :-1], dtype=torch.float32).reshape(-1, 8, 8), torch.tensor(raw[:, -1], dtype=torch.long)


def splits(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """60/20/20 train/val/test split of sklearn's digits, fixed by ``seed``."""
    images, y = digits_arrays()
    x = images.unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    parts = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    return tuple(TensorDataset(x[p], y[p]) for p in parts)


def _train_teacher(train: TensorDataset, val: TensorDataset, seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    cfg = TrainConfig(epochs=40, lr=3e-3, scheduler="onecycle", patience=12)
    with threads(TEACHER_THREADS):
        fit(model, train, lambda out, t: nn.functional.cross_entropy(out, t[0]), cfg,
            lambda m: accuracy(m, val), seed=seed)
    return model


def teacher(train: TensorDataset, val: TensorDataset, seed: int, cache: BlobCache | None = None) -> DigitsCNN:
    """The trained teacher, from the cache when it was trained before with the same seed."""
    cache = cache or DirCache(home() / "cache")
    key = f"teachers/digits-v{ARCH_VERSION}-seed{seed}.pt"
    model = DigitsCNN()
    if (blob := cache.get(key)) is not None:
        model.load_state_dict(loads(blob, f"teacher checkpoint {key!r}"))
        return model.eval()
    logger.info("training the digits teacher (first use, seed %d)", seed)
    model = _train_teacher(train, val, seed)
    cache.put(key, dumps(model.state_dict()))
    return model.eval()


def default_recipes() -> tuple[Recipe, ...]:
    ft = FinetuneSpec(epochs=6, scheduler="cosine")
    kd50, kd25 = DistillSpec(width=0.5), DistillSpec(width=0.25, depth=0.67, epochs=60)
    int8s = QuantSpec(scheme="int8-static")
    return (
        Recipe(name="prune-global-60", steps=(PruneSpec(method="magnitude-global", ratio=0.6, finetune=ft),)),
        Recipe(name="prune-layer-80-x3", steps=(PruneSpec(method="magnitude-layer", ratio=0.8, iterations=3,
                                                          finetune=FinetuneSpec(epochs=4, scheduler="step")),)),
        Recipe(name="prune-channels-50", steps=(PruneSpec(method="l1-structured", ratio=0.5, iterations=2,
                                                          finetune=FinetuneSpec(epochs=6, scheduler="onecycle")),)),
        Recipe(name="kd-w50", steps=(kd50,)),
        Recipe(name="kd-w25-d67", steps=(kd25,)),
        Recipe(name="int8-dynamic", steps=(QuantSpec(scheme="int8-dynamic"),)),
        Recipe(name="int8-weight-only", steps=(QuantSpec(scheme="int8-weight-only"),)),
        Recipe(name="int8-static", steps=(int8s,)),
        Recipe(name="int8-static-local", steps=(QuantSpec(scheme="int8-static", keep_float=("features.0.0", "head.3")),)),
        Recipe(name="fp16", steps=(QuantSpec(scheme="fp16"),)),
        Recipe(name="prune-channels-50+int8-static", steps=(PruneSpec(method="l1-structured", ratio=0.5, finetune=ft), int8s)),
        Recipe(name="kd-w50+int8-static", steps=(kd50, int8s)),
        Recipe(name="kd-w50+prune-global-50+int8-dynamic",
               steps=(kd50, PruneSpec(method="magnitude-global", ratio=0.5, finetune=ft), QuantSpec(scheme="int8-dynamic"))),
        Recipe(name="kd-w50+prune-channels-30+ft+int8-static",
               steps=(kd50, PruneSpec(method="l1-structured", ratio=0.3, finetune=FinetuneSpec(epochs=0)), ft, int8s)),
    )


def build(seed: int = 0, cache: BlobCache | None = None) -> Workload:
    train, val, test = splits(seed)
    return Workload(
        name="digits",
        teacher=teacher(train, val, seed, cache),
        train=train,
        val=val,
        test=test,
        quality=accuracy,
        quality_name="accuracy",
        task="classification",
        make_student=lambda width, depth: DigitsCNN(width, depth),
        default_recipes=default_recipes(),
    )
