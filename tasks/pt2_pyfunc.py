"""The ``python_function`` flavor of a variant shipped as a torch.export program.

MLflow's own PyTorch flavor gives a pt2 model no pyfunc (its ``predict`` takes one array and no
dict). This module is copied into the logged model's ``code/`` directory and named as its
pyfunc ``loader_module``, so ``mlflow.pyfunc.load_model(uri).predict(...)`` works for every
registered variant, whatever its runtime: one input as a numpy array (or a DataFrame), several
as a dict of arrays by the names in the model's signature (``model_config["inputs"]``). It needs
torch and numpy, not shrinkflow; ``mlflow.pytorch.load_model(uri)`` still returns the program.
"""

from __future__ import annotations

import os

import numpy as np
import torch


class Program:
    def __init__(self, module: torch.nn.Module, names: list[str] | None) -> None:
        self.module, self.names = module, names

    def predict(self, data, params=None) -> np.ndarray:
        if isinstance(data, dict):  # several inputs: in the order the program takes them
            names = self.names or list(data)
            xs = [torch.as_tensor(np.asarray(data[n])) for n in names]
        elif hasattr(data, "to_numpy"):  # a pandas DataFrame: one input, its rows
            xs = [torch.as_tensor(data.to_numpy(dtype=np.float32))]
        else:
            xs = [torch.as_tensor(np.asarray(data))]
        with torch.inference_mode():
            out = self.module(*xs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.numpy()


def _load_pyfunc(path: str, model_config: dict | None = None) -> Program:
    """Called by ``mlflow.pyfunc.load_model`` with the model's ``data`` directory."""
    program = torch.export.load(os.path.join(path, "model.pt2")).module()
    return Program(program, (model_config or {}).get("inputs"))
