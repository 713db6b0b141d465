"""Pull a promoted model: resolve it in the MLflow registry, fetch, verify every checksum."""

from __future__ import annotations

import re
from pathlib import Path

from mlflow.exceptions import MlflowException

from shrinkflow.errors import ArtifactError, SpecError
from tasks import storage, tracking

_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


def resolve(uri: str):
    m = _URI.match(uri)
    if not m:
        raise SpecError(f"Model URI {uri!r} is not understood; expected 'models:/NAME@ALIAS' or 'models:/NAME/VERSION'.")
    c = tracking.client()
    try:
        if m["alias"]:
            return tracking.retrying(c.get_model_version_by_alias, m["name"], m["alias"])
        return tracking.retrying(c.get_model_version, m["name"], m["version"])
    except MlflowException as exc:
        raise ArtifactError(f"Model {uri!r} is not in the registry ({exc.message}); expected a registered, promoted version.") from None


def pull(uri: str, out: Path) -> dict:
    """Download the version's files and manifest into ``out`` once every checksum matches."""
    mv = resolve(uri)
    url = mv.tags.get("manifest")
    if not url:
        raise ArtifactError(f"Model {uri!r} (version {mv.version}) was never promoted to the artifact store; expected a 'manifest' tag.")
    store, key = storage.locate(url)
    manifest, _ = storage.fetch_verified(store, key, out)
    return manifest
