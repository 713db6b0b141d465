import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class TrainedTeacher:
    """The digits teacher (seed 0) as the product caches it: ``home`` is the shrinkflow home it was
    trained into, ``key`` its cache key, ``payload`` the unsealed checkpoint bytes."""

    home: Path
    key: str
    payload: bytes

    def seed(self, cache) -> None:
        """Put it into ``cache`` (a DirCache or a StoreCache), as a first run would have left it."""
        cache.put(self.key, self.payload)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> TrainedTeacher:
    """Trains the digits teacher once per session through the product's own path (the workload
    writing its cache). Training it takes one to two CPU-minutes here, so the tests that do not test
    the training seed their caches and stores with this one instead of training it again."""
    from shrinkflow import workloads
    from shrinkflow.cache import DirCache
    from shrinkflow.workloads import digits

    home = tmp_path_factory.mktemp("digits-home")
    cache = DirCache(home / "cache")
    workloads.load("digits", seed=0, cache=cache)
    key = f"teachers/digits-v{digits.ARCH_VERSION}-seed0.pt"
    return TrainedTeacher(home, key, cache.get(key))
