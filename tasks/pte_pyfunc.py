"""The MLflow model of a variant shipped as an ExecuTorch program (logged as code, not pickled).

MLflow copies this file into the logged model; ``mlflow.pyfunc.load_model(uri)`` runs it with
the model's ``program`` artifact (``model.pte.xz``). It needs mlflow, torch and executorch,
not shrinkflow. ``predict`` takes the program's input (token ids for a text encoder) as a
numpy array or tensor, or, for a program of several inputs, a dict of them by the names in the
model's signature, and returns its output as a numpy array.
"""

from __future__ import annotations

import lzma

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class PteModel(PythonModel):
    def load_context(self, context) -> None:
        from executorch.runtime import Runtime

        with open(context.artifacts["program"], "rb") as f:
            self._raw = lzma.decompress(f.read())
        self._program = Runtime.get().load_program(self._raw)  # reads from _raw: both stay alive with the method
        self._method = self._program.load_method("forward")
        self._max_batch = int(self._method.metadata.input_tensor_meta(0).sizes()[0])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        if isinstance(model_input, dict):  # several inputs: in the order the program takes them
            names = context.model_config.get("inputs") or list(model_input)
            xs = [torch.as_tensor(np.asarray(model_input[n])).contiguous() for n in names]
        else:
            xs = [torch.as_tensor(np.asarray(model_input)).contiguous()]
        step = self._max_batch
        outs = [self._method.execute([x[i:i + step].contiguous() for x in xs])[0] for i in range(0, len(xs[0]), step)]
        return torch.cat(outs).numpy()


mlflow.models.set_model(PteModel())
