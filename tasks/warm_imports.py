"""Modules a variant imports lazily, imported up front where that is paid once for many workers.

The forkserver a local Dask cluster forks its workers from imports this module (see
``flows/runners.py``), so torch.export and dynamo, torchao, torch-pruning and MLflow's SQL
stores are imported once per sweep rather than once per worker on its first variant.
Every import here is one the core or the tracking code makes anyway. One cache is filled too:
MLflow's map of installed packages (about 0.9 s to build), which it consults on every model it logs.
"""

import alembic.runtime.migration  # noqa: F401 - MLflow's schema check on a SQL store
import git  # noqa: F401 - MLflow records the source's git commit on each run
import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import torch._dynamo  # noqa: F401 - torch.export traces with dynamo
import torch.export  # noqa: F401
import torch_pruning  # noqa: F401
import torchao.quantization  # noqa: F401
import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer  # noqa: F401

try:  # MLflow builds it on the first model a process logs; built here, every forked worker inherits it
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()
except (ImportError, AttributeError):  # a later MLflow may build it elsewhere: then each worker builds its own
    pass
