"""The MLflow model of a variant shipped as an ExecuTorch program (logged as code, not pickled).

MLflow copies this file into the logged model; ``mlflow.pyfunc.load_model(uri)`` runs it with
the model's ``program`` artifact (``model.pte.xz``). It needs mlflow, torch and executorch,
not shrinkflow. ``predict`` takes the program's input (token ids for a text encoder) as a
numpy array or tensor and returns its output as a numpy array.
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
        x = torch.as_tensor(np.asarray(model_input)).contiguous()
        outs = [self._method.execute([x[i:i + self._max_batch].contiguous()])[0] for i in range(0, len(x), self._max_batch)]
        return torch.cat(outs).numpy()


mlflow.models.set_model(PteModel())
