"""Promote, or roll back to, a registered version by hand, with the checks of automatic promotion."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import Field

from shrinkflow import budget
from shrinkflow.errors import PromotionError
from shrinkflow.specs import Frozen, SweepSpec
from tasks import describe, tracking
from tasks.promote import PromotionOutcome, evaluate, promote


class PromoteRequest(Frozen):
    model: str = Field(..., title="Registered model", pattern=r"^[A-Za-z0-9_.-]+$", max_length=120,
                       description="The MLflow registered model, e.g. digits-mcu-nrf52840.")
    version: int = Field(..., title="Version", ge=1, description="The registered version to make the champion.")
    rollback: bool = Field(False, title="Roll back", description="Allow a version that does not beat the current "
                           "champion (going back to a previous one). Its artifact is still verified and published.")


@task(name="promote-version", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def promote_version(request: PromoteRequest, flow_run_id: str) -> PromotionOutcome:
    log = get_run_logger()
    c, name, version = tracking.client(), request.model, str(request.version)
    try:
        mv = c.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own REST errors
        raise PromotionError(f"Version {version!r} of model {name!r} is not registered ({exc}); expected an existing version.") from None
    spec = describe.spec_from_tags(mv.tags)
    if "sweep_spec" in mv.tags:  # registered before the spec was kept as one tag per field
        spec = SweepSpec.model_validate_json(mv.tags["sweep_spec"])
    if spec is None or "spec_hash" not in mv.tags:
        raise PromotionError(f"Version {version} of {name!r} was not registered by shrinkflow (no 'spec.*' tags); "
                             "expected a sweep's version.")
    _, limits = budget.resolve(spec.device, spec.budget)
    quality, _ = evaluate(spec, mv.run_id)  # also proves the deployable is there and loads
    metrics = dict(tracking.retrying(c.get_run, mv.run_id).data.metrics) | {"quality": quality}
    outcome = promote(spec, name, version, mv.run_id, quality, limits, metrics, flow_run_id, rollback=request.rollback)
    log.info("%s v%s: %s", name, version, outcome.reason)
    return outcome


@flow(name="promote")
def promote_flow(request: PromoteRequest) -> PromotionOutcome:
    """Make a registered version the champion (or roll back to it), with the manifest written as usual."""
    return promote_version(request, str(flow_run.get_id() or "local"))
