"""Model logging on the embedded SQLite default: the shipped program is the MLflow model, not a re-export."""

from __future__ import annotations

import lzma
from pathlib import Path

import mlflow
import pytest
import torch

from shrinkflow import artifact


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks import tracking

    return tracking


def test_log_model_logs_the_shipped_program_without_exporting_again(tracking, toy, example, monkeypatch):
    packed = artifact.pack(toy, example)
    shipped = artifact.unpack(packed)
    exp = tracking.experiment_id("unit-logging")
    run_id = tracking.start_child("none", exp, "toy")

    def no_export(*args, **kwargs):
        raise AssertionError("log_model exported the model again")

    with monkeypatch.context() as patch:
        patch.setattr(torch.export, "export", no_export)
        uri = tracking.log_model(run_id, shipped, example, packed.filename, packed.data)

    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert (local / "data" / "model.pt2").read_bytes() == lzma.decompress(packed.data)
    info = mlflow.models.Model.load(str(local / "MLmodel"))
    assert info.flavors["pytorch"]["model_data"] == "data"
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 8, 8)
    assert info.metadata["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 1, 8, 8],
                                        "dynamic": {"0": {"min": 1, "max": None}}}]
    assert info.run_id == run_id
    assert {a.path for a in tracking.client().list_artifacts(run_id, "deploy")} == {f"deploy/{packed.filename}"}

    probe = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(mlflow.pytorch.load_model(uri)(probe), toy(probe), atol=1e-5)


def test_a_run_counts_as_done_only_once_its_record_is_written(tracking, toy, example):
    from shrinkflow.specs import VariantResult

    packed = artifact.pack(toy, example)
    exp = tracking.experiment_id("unit-resume")
    run_id = tracking.start_child("parent", exp, "toy", variant_key="k1")
    tracking.log_model(run_id, artifact.unpack(packed), example, packed.filename, packed.data)
    assert tracking.client().get_run(run_id).info.status == "FINISHED"  # ended by the start_run block
    assert tracking.finished_variant(exp, "k1") is None  # a crash here must not leave a reusable run
    tracking.log_variant(run_id, VariantResult(name="toy", run_id=run_id, skipped="a record"))
    tracking.finish(run_id)
    found = tracking.finished_variant(exp, "k1")
    assert found is not None and found.run_id == run_id and found.skipped == "a record"


def test_experiment_opens_as_model_training_and_runs_read_with_units(tracking):
    from shrinkflow.specs import Recipe, Report, VariantResult, Verdict

    exp = tracking.experiment_id("unit-kind")
    assert tracking.client().get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    run_id = tracking.start_child("parent", exp, "kd-w25")
    report = Report(quality=0.9, size_bytes=34_552, raw_size_bytes=90_000, params=1, nonzero_params=1, sparsity=0.0,
                    macs=1, latency_p50_ms=0.6, latency_p95_ms=0.8, peak_memory_bytes=2_500_000, energy_mj=0.01,
                    energy_source="estimated", threads=1, artifact_format="torch.export")
    recipe = Recipe(name="kd-w25", steps=({"kind": "distill", "width": 0.25},))
    tracking.log_variant(run_id, VariantResult(name="kd-w25", recipe=recipe, report=report, verdict=Verdict(fits=True)))
    tracking.describe_run(run_id, "**kd-w25** won")
    run = tracking.client().get_run(run_id)
    assert run.info.run_name == "kd-w25" and run.data.tags["mlflow.runName"] == "kd-w25"
    assert run.data.metrics["size_kb"] == 34.55 and run.data.metrics["peak_memory_mb"] == 2.5
    assert run.data.metrics["size_bytes"] == 34_552  # the exact count stays, for what reads it back
    assert run.data.params["steps.0.width"] == "0.25" and "None" not in run.data.params.values()
    assert run.data.tags["mlflow.note.content"] == "**kd-w25** won"
