"""Promotion: register the winner, keep the champion unless beaten, publish with a manifest.

Order, so that nothing is half-done: register the version; compare it with the current
champion on this sweep's own test split; write the files, verify them, write the manifest;
move the store's champion pointer; move the MLflow alias last. A failure at any point leaves
the previous champion in force in both places.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shrinkflow import artifact
from shrinkflow.errors import PromotionError
from shrinkflow.specs import Budget, Frozen, SweepSpec, VariantResult
from tasks import config, storage, tracking
from tasks.compress import _context

LOAD_HINT = ("import io, lzma, torch; model = torch.export.load(io.BytesIO(lzma.decompress("
             "open('model.pt2.xz', 'rb').read()))).module()")


class PromotionOutcome(Frozen):
    model: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None = None
    manifest_uri: str | None = None


def _existing_version(name: str, run_id: str):
    found = tracking.retrying(tracking.client().search_model_versions, f"name='{name}' and run_id='{run_id}'")
    return found[0] if found else None


def _register(name: str, winner: VariantResult, tags: dict[str, str]):
    c = tracking.client()
    try:
        tracking.retrying(c.create_registered_model, name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    existing = _existing_version(name, winner.run_id)
    if existing is not None:  # a retried promotion reuses its version
        return existing
    return tracking.retrying(mlflow.register_model, winner.model_uri, name, tags=tags)


def _champion(name: str):
    try:
        return tracking.client().get_model_version_by_alias(name, config.CHAMPION)
    except MlflowException:
        return None


def _deployable(run_id: str) -> tuple[str, bytes]:
    """The deployable file logged with a variant's run."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tracking.retrying(mlflow.artifacts.download_artifacts, run_id=run_id, artifact_path="deploy",
                                       dst_path=tmp, tracking_uri=config.tracking_uri()))
        files = [p for p in local.iterdir() if p.name in artifact.FILENAMES.values()]
        if len(files) != 1:
            raise PromotionError(f"Run {run_id!r} holds {len(files)} deployable files; expected exactly one.")
        return files[0].name, files[0].read_bytes()


def _evaluate(spec: SweepSpec, run_id: str) -> tuple[float, int]:
    """(quality on the spec's test split, shipped size) of the deployable logged with a run."""
    ctx = _context(spec.workload, spec.seed)
    fname, data = _deployable(run_id)
    fmt = {v: k for k, v in artifact.FILENAMES.items()}[fname]
    return ctx.workload.quality(artifact.loads(data, fmt), ctx.workload.test), len(data)


def _beats(spec: SweepSpec, quality: float, size: int, champion) -> tuple[bool, str]:
    """Re-evaluate the champion on this sweep's test split and compare (quality, then size)."""
    champ_q, champ_size = _evaluate(spec, champion.run_id)
    if quality > champ_q or (quality == champ_q and size < champ_size):
        return True, f"quality {quality:.4f} vs champion v{champion.version} {champ_q:.4f} (size {size} vs {champ_size} B)"
    return False, (f"champion v{champion.version} is not beaten on the same evaluation: quality {champ_q:.4f} "
                   f"(size {champ_size} B) vs {quality:.4f} ({size} B)")


def publish(name: str, version: str, run_id: str, limits: Budget, metrics: dict, spec: SweepSpec,
            flow_run_id: str, reason: str) -> str:
    """Files, verified, then the manifest, then the store's pointer, then the MLflow alias (last)."""
    c, store = tracking.client(), storage.open_store(config.store_uri())
    fname, data = _deployable(run_id)
    fields = {"format": {v: k for k, v in artifact.FILENAMES.items()}[fname], "compression": "xz",
              "load": LOAD_HINT, "metrics": metrics, "budget": limits.model_dump(), "device": spec.device,
              "workload": spec.workload, "registry_name": name, "registry_version": version, "mlflow_run_id": run_id,
              "prefect_flow_run_id": flow_run_id, "spec_hash": spec.spec_hash(),
              "created": datetime.now(timezone.utc).isoformat()}
    manifest_key = storage.publish(store, name, version, {fname: data}, fields)
    storage.set_pointer(store, name, version, manifest_key)
    manifest_uri = store.url(manifest_key)
    for key, value in (("manifest", manifest_uri), ("promotion", "accepted"), ("promotion_reason", reason)):
        tracking.retrying(c.set_model_version_tag, name, version, key, value)
    tracking.retrying(c.set_registered_model_alias, name, config.CHAMPION, version)  # last: only after the store
    return manifest_uri


def reject(name: str, version: str, reason: str) -> None:
    c = tracking.client()
    tracking.retrying(c.set_model_version_tag, name, version, "promotion", "rejected")
    tracking.retrying(c.set_model_version_tag, name, version, "promotion_reason", reason)


@task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def promote_task(spec: SweepSpec, model_name: str, winner: VariantResult, limits: Budget, flow_run_id: str) -> PromotionOutcome:
    log = get_run_logger()
    name = model_name
    metrics = tracking.variant_fields(winner)[1]
    tags = {"budget": json.dumps(limits.model_dump(), sort_keys=True), "metrics": json.dumps(metrics, sort_keys=True),
            "spec_hash": spec.spec_hash(), "source_run": winner.run_id, "variant": winner.name, "device": spec.device,
            "prefect_flow_run_id": flow_run_id, "sweep_spec": spec.model_dump_json(exclude={"recipes"})}
    mv = _register(name, winner, tags)
    version = str(mv.version)
    champion = _champion(name)
    if champion is not None and str(champion.version) == version:
        return PromotionOutcome(model=name, version=version, promoted=True, reason="already the champion",
                                champion_version=version, manifest_uri=mv.tags.get("manifest"))
    if champion is not None:
        better, reason = _beats(spec, winner.report.quality, winner.report.size_bytes, champion)
        if not better:
            reject(name, version, reason)
            log.info("version %s kept out: %s", version, reason)
            return PromotionOutcome(model=name, version=version, promoted=False, reason=reason,
                                    champion_version=str(champion.version))
    else:
        reason = "first champion for this model"
    manifest_uri = publish(name, version, winner.run_id, limits, metrics, spec, flow_run_id, reason)
    log.info("promoted %s v%s to %s (%s)", name, version, manifest_uri, reason)
    return PromotionOutcome(model=name, version=version, promoted=True, reason=reason,
                            champion_version=version, manifest_uri=manifest_uri)
