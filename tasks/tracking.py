"""MLflow tracking: one experiment per spec name, a parent run per flow run, a child run per variant.

Worker threads use ``MlflowClient`` with explicit run ids (the fluent active run is
thread-local). Every write goes through :func:`retrying`, which backs off on the transient
errors of a busy SQLite file or a restarting tracking server.
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import platform
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import numpy as np
import torch
import yaml
from mlflow import MlflowClient, pyfunc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types import Schema, TensorSpec

from shrinkflow import artifact
from shrinkflow.export import GRAPH_LOCK
from shrinkflow.errors import ArtifactError
from shrinkflow.specs import SweepSpec, VariantResult, flatten
from tasks import config

logger = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT = ("database is locked", "connection", "timed out", "temporarily", "503", "502", "504", "max retries")
METRICS = ("quality", "size_bytes", "raw_size_bytes", "params", "nonzero_params", "sparsity", "macs",
           "latency_p50_ms", "latency_p95_ms", "latency_raw_p50_ms", "latency_runs", "reference_ms", "peak_memory_bytes",
           "energy_mj")


#: The variant record every child run carries, read back by :func:`finished_variant`.
MEASUREMENT = "measurement.json"

_retries = 0  # transient errors retried in this process (a worker runs one variant at a time)


def retry_count() -> int:
    return _retries


def retrying(fn: Callable[..., T], *args, attempts: int = 8, base: float = 0.2, **kwargs) -> T:
    """Call ``fn``, retrying transient tracking errors with exponential backoff and jitter."""
    global _retries
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:
            text = str(exc).lower()
            if attempt == attempts or not any(s in text for s in _TRANSIENT):
                raise
            _retries += 1
            delay = base * 2 ** (attempt - 1) * (1 + random.random())
            logger.warning("MLflow call %s failed (%s); retry %d in %.1fs", fn.__name__, str(exc)[:120], attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def use_tracking_uri() -> str:
    """Point MLflow at this sweep's tracking URI. MLflow also exports it as MLFLOW_TRACKING_URI,
    which worker processes inherit: call it before starting any, or they would inherit what an
    earlier sweep in this process exported (another home's database) and log there."""
    uri = config.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def client() -> MlflowClient:
    return MlflowClient(use_tracking_uri())


#: The experiment tag that makes the MLflow UI open an experiment as model training (not GenAI).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(name: str) -> str:
    c = client()
    exp = retrying(c.get_experiment_by_name, name)
    if exp is None:
        location = (config.mlflow_artifacts_root() / name).as_uri() if config.local_tracking() else None
        try:
            return retrying(c.create_experiment, name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:  # created by a concurrent run in the meantime
            exp = retrying(c.get_experiment_by_name, name)
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:  # made by an earlier version, or by hand
            retrying(c.set_experiment_tag, exp.experiment_id, key, value)
    return exp.experiment_id


def describe_run(run_id: str, markdown: str) -> None:
    """The run's description in the MLflow UI (Markdown)."""
    retrying(client().set_tag, run_id, "mlflow.note.content", markdown)


def start_parent(spec: SweepSpec, flow_run_id: str, device: str) -> str:
    c = client()
    tags = {"prefect.flow_run_id": flow_run_id, "spec_hash": spec.spec_hash(), "device": device,
            "workload": spec.workload, "role": "sweep"}
    run = retrying(c.create_run, experiment_id(spec.name), tags=tags, run_name=f"{spec.name}-{spec.spec_hash()[:8]}")
    params = flatten(spec.model_dump(mode="json", exclude={"recipes"}, exclude_none=True))  # no "budget None"
    params["recipes"] = ",".join(r.name for r in spec.recipes) if spec.recipes else "default"
    retrying(c.log_batch, run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    log_json(run.info.run_id, "spec.json", spec.model_dump(mode="json"))
    return run.info.run_id


def log_json(run_id: str, name: str, data: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        retrying(client().log_artifact, run_id, str(path))


def host_pid() -> str:
    """This process, as run tags name it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def log_variant(run_id: str, result: VariantResult, retimed: bool = False) -> None:
    """The variant's measurement on its run: params, metrics and tags, and the whole record as
    JSON. ``retimed``: its latency figures were timed again with the other finalists, here
    (tagged ``retimed_host_pid``: where the figures judged were taken)."""
    params, metrics, tags = variant_fields(result)
    if retimed:
        tags["retimed_host_pid"] = host_pid()
    now = int(time.time() * 1000)
    retrying(client().log_batch, run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
             params=[Param(k, v[:6000]) for k, v in params.items()], tags=[RunTag(k, v) for k, v in tags.items()])
    log_json(run_id, MEASUREMENT, result.model_dump(mode="json"))
    retrying(client().set_tag, run_id, "measurement", MEASUREMENT)  # last: the record is complete


def start_child(parent_run_id: str, exp_id: str, name: str, role: str = "variant", variant_key: str | None = None) -> str:
    """A child run under the parent; a rerun of the same variant in the same sweep reuses its run.

    Find-or-create is retried as a whole: if the tracking server went away after creating the
    run but before answering, the retry finds that run instead of creating a second one.
    """
    c = client()
    host = {"host": socket.gethostname(), "host_pid": host_pid()}
    tags = {"mlflow.parentRunId": parent_run_id, "mlflow.runName": name, "role": role, **host}  # named in every UI view
    if variant_key is not None:
        tags["variant_key"] = variant_key

    def find_or_create() -> str:
        if variant_key is not None:
            mine = c.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                 f"and tags.variant_key = '{variant_key}'", max_results=1)
            if mine:
                run_id = mine[0].info.run_id
                c.update_run(run_id, "RUNNING")
                c.log_batch(run_id, tags=[RunTag(k, v) for k, v in host.items()])
                return run_id
        return c.create_run(exp_id, tags=tags, run_name=name).info.run_id

    return retrying(find_or_create)


def finished_variant(exp_id: str, variant_key: str) -> VariantResult | None:
    """The record of a FINISHED run of the same variant (same recipe, teacher, data), if any.

    Only a run whose record was written counts (tag ``measurement``): logging a model ends its
    run's ``start_run`` block, so a run can read FINISHED before its record is there."""
    c = client()
    runs = retrying(c.search_runs, [exp_id], filter_string=f"tags.variant_key = '{variant_key}' and "
                    f"tags.measurement = '{MEASUREMENT}' and attributes.status = 'FINISHED'", max_results=1)
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = retrying(mlflow.artifacts.download_artifacts, run_id=runs[0].info.run_id,
                        artifact_path=MEASUREMENT, dst_path=tmp, tracking_uri=config.tracking_uri())
        return VariantResult.model_validate_json(Path(path).read_text())


def variant_fields(result: VariantResult) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
    """(params, metrics, tags) of a variant record."""
    params = flatten(result.recipe.model_dump(mode="json", exclude_none=True)) if result.recipe else {}
    metrics = {k: float(getattr(result.report, k)) for k in METRICS if result.report and getattr(result.report, k) is not None}
    if result.report:
        metrics |= unit_metrics(result.report)
        metrics |= {k: float(v) for k, v in result.report.extra.items()}  # workload scores, e.g. spearman
    metrics["seconds"] = result.seconds
    metrics["tracking_retries"] = float(result.tracking_retries)
    tags = {"fits_budget": str(result.fits).lower(),
            "failed_limits": ",".join(m.limit for m in result.verdict.misses) if result.verdict else "",
            "skipped_reason": result.skipped or ""}
    if result.report:
        tags |= {"energy_source": result.report.energy_source, "artifact_format": result.report.artifact_format,
                 "threads": str(result.report.threads)}
    return params, metrics, tags


def unit_metrics(report) -> dict[str, float]:
    """The sizes as a person reads them (kB of 10^3 bytes, MB of 10^6), rounded, beside the exact byte counts."""
    ci = {"latency_p50_ci_low_ms": report.latency_ci_ms[0], "latency_p50_ci_high_ms": report.latency_ci_ms[1]} \
        if report.latency_ci_ms else {}
    return {"size_kb": round(report.size_bytes / 1e3, 2), "raw_size_kb": round(report.raw_size_bytes / 1e3, 2),
            "peak_memory_mb": round(report.peak_memory_bytes / 1e6, 3), **ci}


def log_model(run_id: str, shipped: torch.nn.Module, example_inputs: tuple, deploy_name: str, deploy: bytes,
              assets: dict[str, bytes] | None = None, dynamic_dims: tuple[int, ...] = (0,),
              input_names: tuple[str, ...] | None = None) -> str:
    """Log the variant as an MLflow PyTorch model (torch.export "pt2") and, under ``deploy/``, its
    deployable file and the files shipped beside it (``assets``: a tokenizer, say).

    A torch.export deployable is logged as the model's program as it is (decompressed): no
    second export, and ``mlflow.pytorch.load_model`` returns the very program that ships. An
    ExecuTorch deployable is logged as a pyfunc model from code (tasks/pte_pyfunc.py, needing
    mlflow, torch and executorch) that runs it. TorchScript goes through
    ``mlflow.pytorch.log_model``, which exports ``shipped``.

    ``dynamic_dims``: input dimensions left free (-1 in the signature): the batch, and for token
    inputs the sequence length (the shipped program was exported with them dynamic).
    """
    batched = tuple(torch.cat([t, t]) for t in example_inputs)  # batch 2: a dynamic batch dimension
    with torch.inference_mode():
        out = shipped(*batched)
    fmt = {v: k for k, v in artifact.FILENAMES.items()}[deploy_name]
    inputs = artifact.input_spec(deploy, fmt, example_inputs, dynamic_dims, input_names)
    names = tuple(i["name"] for i in inputs) if len(inputs) > 1 else None  # one input: unnamed, so predict takes an array
    shipped_dims = tuple(sorted({int(d) for i in inputs for d in i["dynamic"]})) if inputs else dynamic_dims  # what the program took
    signature = ModelSignature(inputs=_schema(batched, "input", shipped_dims, names), outputs=_schema((out,), "output"))
    metadata = {"inputs": inputs, "inputs_text": artifact.describe_inputs(inputs), "format": fmt}
    pip = [f"torch=={torch.__version__.split('+')[0]}"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in {deploy_name: deploy, **(assets or {})}.items():
            (Path(tmp) / name).write_bytes(data)
        if deploy_name == artifact.FILENAMES["torch.export"]:
            program = lzma.decompress(deploy)

            def _log() -> str:
                with mlflow.start_run(run_id=run_id):  # the logged model goes to the run's experiment
                    return Model.log(None, _ShippedProgram, name="model", flavor_name="mlflow.pytorch", run_id=run_id,
                                     serialization_format="pt2", program=program, signature=signature,
                                     pip_requirements=pip, metadata=metadata).model_uri
        elif deploy_name == artifact.FILENAMES["executorch"]:
            def _log() -> str:
                with mlflow.start_run(run_id=run_id):
                    return mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("pte_pyfunc.py")),
                                                   artifacts={"program": str(Path(tmp) / deploy_name)}, signature=signature,
                                                   pip_requirements=[*pip, "executorch==1.5.1", "numpy"],
                                                   model_config={"inputs": [i["name"] for i in inputs]},
                                                   metadata=metadata).model_uri
        elif deploy_name == artifact.FILENAMES["onnx"]:
            import onnx
            from mlflow import onnx as mlflow_onnx

            proto = onnx.load_model_from_string(lzma.decompress(deploy))

            def _log() -> str:
                with mlflow.start_run(run_id=run_id):  # the program as it ships; pyfunc predict runs ONNX Runtime
                    return mlflow_onnx.log_model(proto, name="model", signature=signature, save_as_external_data=False,
                                                 pip_requirements=[f"onnx=={onnx.__version__}", "onnxruntime", "numpy"],
                                                 metadata=metadata).model_uri
        else:
            def _log() -> str:
                with mlflow.start_run(run_id=run_id), GRAPH_LOCK:  # log_model runs torch.export
                    return mlflow.pytorch.log_model(shipped, name="model", signature=signature, serialization_format="pt2",
                                                    input_example=batched[0] if len(batched) == 1 else batched,
                                                    pip_requirements=pip, metadata=metadata).model_uri

        uri = retrying(_log)
        retrying(client().log_artifacts, run_id, tmp, "deploy")
    return uri


#: The module name tasks/pt2_pyfunc.py is copied under into a logged torch.export model's code/.
PT2_PYFUNC = "shrinkflow_pt2_pyfunc"


class _ShippedProgram:
    """An MLflow flavor module for ``Model.log``: writes an already exported program in the layout
    ``mlflow.pytorch.save_model(..., serialization_format="pt2")`` writes (``data/model.pt2``, the
    ``pytorch`` flavor, the environment files), so ``mlflow.pytorch.load_model`` loads it."""

    @staticmethod
    def save_model(path: str, mlflow_model: Model, program: bytes, signature: ModelSignature,
                   pip_requirements: list[str], serialization_format: str = "pt2") -> None:
        root = Path(path)
        (root / "data").mkdir(parents=True)
        (root / "data" / "model.pt2").write_bytes(program)
        mlflow_model.signature = signature
        mlflow_model.add_flavor("pytorch", model_data="data", pytorch_version=str(torch.__version__), code=None)
        (root / "code").mkdir()  # MLflow puts a pyfunc's code/ on sys.path when it loads the model
        shutil.copyfile(Path(__file__).with_name("pt2_pyfunc.py"), root / "code" / f"{PT2_PYFUNC}.py")
        pyfunc.add_to_model(mlflow_model, loader_module=PT2_PYFUNC, data="data", code="code", python_env="python_env.yaml",
                            conda_env="conda.yaml",
                            model_config={"inputs": [n for n in signature.inputs.input_names() if isinstance(n, str)] or None})
        mlflow_model.model_size_bytes = len(program)
        mlflow_model.save(str(root / MLMODEL_FILE_NAME))
        _write_environment(root, pip_requirements)


def _write_environment(root: Path, pip_requirements: list[str]) -> None:
    """The environment files of MLflow's documented model layout (requirements.txt,
    python_env.yaml, conda.yaml), written from public facts: the Python, mlflow and pins given."""
    reqs = [f"mlflow=={mlflow.__version__}", *pip_requirements]
    python = platform.python_version()
    (root / "requirements.txt").write_text("\n".join(reqs) + "\n")
    (root / "python_env.yaml").write_text(yaml.safe_dump(
        {"python": python, "build_dependencies": ["pip", "setuptools", "wheel"], "dependencies": ["-r requirements.txt"]},
        sort_keys=False))
    (root / "conda.yaml").write_text(yaml.safe_dump(
        {"name": "mlflow-env", "channels": ["conda-forge"], "dependencies": [f"python={python}", "pip", {"pip": reqs}]},
        sort_keys=False))


def _schema(tensors: tuple[torch.Tensor, ...], prefix: str, dynamic_dims: tuple[int, ...] = (0,),
            names: tuple[str, ...] | None = None) -> Schema:
    """Tensor specs with the ``dynamic_dims`` (the batch, by default) variable, named by ``names``
    (else ``prefix_i`` when there are several)."""
    if names is None and len(tensors) > 1:
        names = tuple(f"{prefix}_{i}" for i in range(len(tensors)))
    return Schema([TensorSpec(np.dtype(str(t.dtype).removeprefix("torch.")),
                              tuple(-1 if d in dynamic_dims else n for d, n in enumerate(t.shape)),
                              name=names[i] if names else None) for i, t in enumerate(tensors)])


def finish(run_id: str, status: str = "FINISHED") -> None:
    retrying(client().set_terminated, run_id, status)


def deployable(run_id: str) -> tuple[str, bytes, dict[str, bytes]]:
    """The deployable program logged with a variant's run, and the files shipped beside it
    (a tokenizer, say): (program file name, its bytes, {asset name: bytes})."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(retrying(mlflow.artifacts.download_artifacts, run_id=run_id, artifact_path="deploy",
                              dst_path=tmp, tracking_uri=config.tracking_uri()))
        files = [p for p in local.iterdir() if p.name in artifact.FILENAMES.values()]
        if len(files) != 1:
            raise ArtifactError(f"Run {run_id!r} holds {len(files)} deployable files; expected exactly one.")
        assets = {p.name: p.read_bytes() for p in sorted(local.iterdir()) if p.is_file() and p != files[0]}
        return files[0].name, files[0].read_bytes(), assets
