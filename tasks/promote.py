"""Promotion: register the winner, keep the champion unless beaten, publish with a manifest.

Order, so that nothing is half-done: register the version; compare it with the champion the
store's pointer names, on this sweep's own test split; write the files, verify them, create
the manifest; move the pointer by compare-and-swap; move the MLflow alias last. A failure at
any point leaves the previous champion in force in both places; two promotions racing end
with one champion, the loser comparing again against the winner.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone

import mlflow
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shrinkflow import artifact
from shrinkflow.errors import PromotionError
from shrinkflow.specs import Budget, Frozen, SweepSpec, VariantResult
from tasks import config, describe, storage, tracking
from tasks.compress import context


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
    model_id = winner.model_uri.removeprefix("models:/") if winner.model_uri.startswith("models:/m-") else None
    return tracking.retrying(c.create_model_version, name, winner.model_uri, run_id=winner.run_id, tags=tags,
                             model_id=model_id)  # the client: no "Created version ..." lines on stderr


def _champion(name: str):
    try:
        return tracking.client().get_model_version_by_alias(name, config.CHAMPION)
    except MlflowException:
        return None


def program_inputs(name: str, version: str, fmt: str, program: Callable[[], bytes]) -> list[dict]:
    """The program's inputs (names, dtypes, shapes, dynamic dimensions and bounds), as recorded in the
    registered model's metadata when it was logged; else read from the program (``program()``) itself."""
    try:
        info = tracking.retrying(mlflow.models.get_model_info, f"models:/{name}/{version}")
        if info.metadata and info.metadata.get("inputs"):
            return info.metadata["inputs"]
    except MlflowException:
        pass  # a version logged without metadata: read the program
    return artifact.input_spec(program(), fmt)


def evaluate(spec: SweepSpec, run_id: str) -> tuple[float, int]:
    """(quality on the spec's test split, shipped size) of the deployable logged with a run."""
    ctx = context(**spec.workload_args())
    fname, data, _ = tracking.deployable(run_id)
    fmt = {v: k for k, v in artifact.FILENAMES.items()}[fname]
    return ctx.workload.quality(artifact.loads(data, fmt), ctx.workload.test), len(data)


def _beats(spec: SweepSpec, quality: float, size: int, champion) -> tuple[bool, str]:
    """Re-evaluate the champion on this sweep's test split and compare (quality, then size)."""
    champ_q, champ_size = evaluate(spec, champion.run_id)
    if quality > champ_q or (quality == champ_q and size < champ_size):
        return True, f"quality {quality:.4f} vs champion v{champion.version} {champ_q:.4f} (size {size} vs {champ_size} B)"
    return False, (f"champion v{champion.version} is not beaten on the same evaluation: quality {champ_q:.4f} "
                   f"(size {champ_size} B) vs {quality:.4f} ({size} B)")


def _follow_pointer(name: str, store: storage.Store) -> str | None:
    """Point the MLflow alias at the version the store's champion pointer names.

    After writing the alias the pointer is read again: whoever writes the alias last has seen
    the pointer unchanged after its write, so racing promotions leave both places in agreement.
    """
    c = tracking.client()
    for _ in range(10):
        pointer = storage.read_pointer(store, name)
        if pointer is None:
            return None
        target = pointer["version"]
        current = _champion(name)
        if current is None or str(current.version) != target:
            tracking.retrying(c.set_registered_model_alias, name, config.CHAMPION, target)
        if (storage.read_pointer(store, name) or {}).get("version") == target:
            return target
    raise PromotionError(f"The champion pointer of {name!r} kept moving while the MLflow alias followed it; "
                         f"expected it to settle. Re-run the promotion.")


def _restore_pointer(store: storage.Store, name: str, previous: dict | None, etag: str) -> str:
    """Put the previous champion back in the store after a later step failed; says what it did."""
    try:
        if previous is None:
            store.delete_if(f"{name}/{storage.POINTER}", etag)
        else:
            storage.swap_pointer(store, name, json.dumps(previous, sort_keys=True).encode(), etag)
        return "the store's champion pointer was put back"
    except Exception as exc:  # noqa: BLE001 - report both failures
        return f"putting the store's champion pointer back also failed ({exc}); the next promotion re-aligns the alias to it"


def _already_champion(name: str, version: str, pointer: dict | None, store: storage.Store) -> PromotionOutcome:
    """A re-run: nothing to write, but finish what an interrupted promotion left (alias, tags)."""
    _follow_pointer(name, store)
    mv = tracking.retrying(tracking.client().get_model_version, name, version)
    manifest_uri = mv.tags.get("manifest") or (store.url(pointer["manifest"]) if pointer else None)
    if pointer and mv.tags.get("promotion") != "accepted":
        _accept(name, version, manifest_uri, "completed by a re-run of an interrupted promotion")
    return PromotionOutcome(model=name, version=version, promoted=True, reason="already the champion",
                            champion_version=version, manifest_uri=manifest_uri)


#: Attempts at moving the pointer when other promotions keep moving it first.
CAS_ATTEMPTS = 5


def promote(spec: SweepSpec, name: str, version: str, run_id: str, quality: float, limits: Budget, metrics: dict,
            flow_run_id: str, rollback: bool = False) -> PromotionOutcome:
    """Make ``version`` the champion if it beats the current one (or ``rollback`` asks for it).

    Order: compare with the champion the store's pointer names, on this sweep's own test split;
    write the files under the version's prefix, verify them, create the manifest; move the
    pointer by compare-and-swap; move the MLflow alias last. If another promotion moved the
    pointer in between, compare again against the new champion (a rollback stops instead).
    A failure at any step leaves the previous champion in force in the store and in MLflow.
    """
    log = get_run_logger()
    c, store = tracking.client(), storage.open_store(config.store_uri())
    fname, data, assets = tracking.deployable(run_id)
    size = len(data)
    fmt = {v: k for k, v in artifact.FILENAMES.items()}[fname]
    inputs = program_inputs(name, version, fmt, lambda: data)
    fields = {"format": fmt, "compression": "xz", "inputs": inputs, "inputs_text": artifact.describe_inputs(inputs),
              "load_with": describe.LOADERS[fmt], "load": describe.load_snippet(fmt, inputs), "program": fname,
              "assets": sorted(assets), "metrics": metrics, "budget": limits.model_dump(), "device": spec.device,
              "workload": spec.workload, "registry_name": name, "registry_version": version, "mlflow_run_id": run_id,
              "prefect_flow_run_id": flow_run_id, "spec_hash": spec.spec_hash(),
              "created": datetime.now(timezone.utc).isoformat()}
    for attempt in range(1, CAS_ATTEMPTS + 1):
        pointer, etag = storage.read_pointer_tagged(store, name)
        alias = _champion(name)
        champ_version = pointer["version"] if pointer else (str(alias.version) if alias else None)
        if champ_version == version:
            return _already_champion(name, version, pointer, store)
        reason = "first champion for this model"
        if champ_version is not None:
            champion = tracking.retrying(c.get_model_version, name, champ_version)
            better, reason = _beats(spec, quality, size, champion)
            if not better and not rollback:
                if attempt > 1:
                    reason = f"beaten by a concurrent promotion: {reason}"
                reject(name, version, reason)
                log.info("version %s kept out: %s", version, reason)
                return PromotionOutcome(model=name, version=version, promoted=False, reason=reason,
                                        champion_version=champ_version)
            if not better:
                reason = f"rollback from v{champ_version} by request ({reason})"
        manifest_key = storage.publish(store, name, version, {fname: data, **assets}, fields)
        body = storage.pointer_body(store, name, version, manifest_key)
        try:
            new_etag = storage.swap_pointer(store, name, body, etag)
            break
        except storage.Conflict:
            if rollback:
                raise PromotionError(f"The champion of {name!r} changed while rolling back to v{version}; "
                                     f"expected it to stay v{champ_version}. Nothing was moved; re-run the rollback.") from None
            log.warning("champion pointer of %s moved while promoting v%s (attempt %d); comparing with the new champion",
                        name, version, attempt)
    else:
        raise PromotionError(f"The champion pointer of {name!r} moved {CAS_ATTEMPTS} times while promoting v{version}; "
                             f"expected it to settle. Nothing of v{version} is in force; re-run the promotion.")
    manifest_uri = store.url(manifest_key)
    try:
        _follow_pointer(name, store)  # last: only after the store holds a verified manifest and the pointer
    except Exception as exc:
        undo = _restore_pointer(store, name, pointer, new_etag)
        raise PromotionError(f"Moving the MLflow alias of {name!r} to v{version} failed ({exc}); {undo}.") from exc
    _accept(name, version, manifest_uri, reason)
    log.info("promoted %s v%s to %s (%s)", name, version, manifest_uri, reason)
    return PromotionOutcome(model=name, version=version, promoted=True, reason=reason,
                            champion_version=version, manifest_uri=manifest_uri)


def _accept(name: str, version: str, manifest_uri: str | None, reason: str) -> None:
    c = tracking.client()
    for key, value in (("manifest", manifest_uri or ""), ("promotion", "accepted"), ("promotion_reason", reason)):
        tracking.retrying(c.set_model_version_tag, name, version, key, value)


def reject(name: str, version: str, reason: str) -> None:
    c = tracking.client()
    tracking.retrying(c.set_model_version_tag, name, version, "promotion", "rejected")
    tracking.retrying(c.set_model_version_tag, name, version, "promotion_reason", reason)


@task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def promote_task(spec: SweepSpec, model_name: str, winner: VariantResult, limits: Budget, flow_run_id: str) -> PromotionOutcome:
    name = model_name
    metrics = tracking.variant_fields(winner)[1]
    tags = {"budget": describe.budget_text(limits), "metrics": describe.metrics_text(metrics), "spec_hash": spec.spec_hash(),
            "source_run": winner.run_id, "variant": winner.name, "device": spec.device, "workload": spec.workload,
            "format": winner.report.artifact_format, "prefect_flow_run_id": flow_run_id, **describe.spec_tags(spec)}
    mv = _register(name, winner, tags)
    describe_version(spec, name, str(mv.version), winner.name, winner.report.artifact_format, limits, metrics)
    return promote(spec, name, str(mv.version), winner.run_id, winner.report.quality, limits, metrics, flow_run_id)


def describe_version(spec: SweepSpec, name: str, version: str, variant: str, fmt: str, limits: Budget,
                     metrics: dict) -> None:
    """Give the registered version a Markdown description and an ``inputs`` tag (read from its model)."""
    c = tracking.client()
    mv = tracking.retrying(c.get_model_version, name, version)
    inputs = program_inputs(name, version, fmt, lambda: tracking.deployable(mv.run_id)[1])
    text = describe.version_description(variant, spec, limits, metrics, inputs, fmt, name, version)
    tracking.retrying(c.update_model_version, name, version, description=text)
    tracking.retrying(c.set_model_version_tag, name, version, "inputs", artifact.describe_inputs(inputs) or "not recorded")
