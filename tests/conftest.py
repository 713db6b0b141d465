import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share the cores: one torch thread each for what runs in the test process
    # (two processes spinning two threads each on two cores slow a training loop down tenfold).
    # Sweeps started as subprocesses and Dask workers set their own thread counts.
    import torch

    torch.set_num_threads(1)


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
    the training seed their caches and stores with this one instead of training it again. Under
    pytest-xdist the workers share it: the first trains it, under a file lock, the others read it."""
    from filelock import FileLock

    from shrinkflow import workloads
    from shrinkflow.cache import DirCache
    from shrinkflow.workloads import digits

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's root, above each worker's
    home = shared / "digits-home"
    cache = DirCache(home / "cache")
    with FileLock(str(shared / "digits-home.lock")):
        workloads.load("digits", seed=0, cache=cache)  # a cache hit for all but the first
    key = f"teachers/digits-v{digits.ARCH_VERSION}-seed0.pt"
    return TrainedTeacher(home, key, cache.get(key))


#: The longest test files, run first: under pytest-xdist (`make test` runs two workers) each worker
#: starts on one of them and the short files fill in beside them, instead of two long ones ending
#: the run side by side.
LONGEST_FIRST = ("tests/integration/test_stack.py", "tests/integration/test_minilm_flow.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        path = Path(str(item.fspath)).relative_to(config.rootpath).as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
