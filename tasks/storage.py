"""The artifact store (a local directory or S3 through boto3) and checksummed manifests.

A promoted version is written as: every file, each read back and verified (size and sha256),
then ``manifest.json`` last; a manifest therefore never names a file that is not there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shrinkflow.errors import ArtifactError

MANIFEST = "manifest.json"
POINTER = "champion.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store(Protocol):
    uri: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def url(self, key: str) -> str: ...


@dataclass
class LocalStore:
    root: Path

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ArtifactError(f"Store key {key!r} escapes the store root; expected a relative key.")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # readers see the old file or the whole new one

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"Object {key!r} is missing from store {self.uri!r}.") from None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def url(self, key: str) -> str:
        return str(self._path(key))


class S3Store:
    """S3 or any S3-compatible endpoint (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        cfg = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                     retries={"max_attempts": 5, "mode": "standard"})
        self.client = boto3.client("s3", config=cfg)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise ArtifactError(f"Object {key!r} is missing from store {self.uri!r}.") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(uri: str) -> Store:
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise ArtifactError(f"Artifact store {uri!r} names no bucket; expected 's3://bucket/prefix'.")
        return S3Store(bucket, prefix)
    return LocalStore(Path(uri.removeprefix("file://")))


def version_prefix(model: str, version: str | int) -> str:
    return f"{model}/v{version}"


def publish(store: Store, model: str, version: str | int, files: dict[str, bytes], fields: dict) -> str:
    """Write ``files`` under the version's prefix, verify each, then write the manifest. Returns its key."""
    prefix = version_prefix(model, version)
    entries = []
    for name, data in sorted(files.items()):
        key = f"{prefix}/{name}"
        store.put(key, data)
        back = store.get(key)
        if len(back) != len(data) or sha256(back) != sha256(data):
            raise ArtifactError(f"Object {key!r} read back {len(back)} bytes with another checksum; expected {len(data)} bytes, sha256 {sha256(data)}.")
        entries.append({"path": name, "sha256": sha256(data), "size": len(data)})
    manifest = {"schema": 1, "model": model, "version": str(version), "files": entries} | fields
    key = f"{prefix}/{MANIFEST}"
    store.put(key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return key


def set_pointer(store: Store, model: str, version: str | int, manifest_key: str) -> None:
    body = {"version": str(version), "manifest": manifest_key, "manifest_sha256": sha256(store.get(manifest_key))}
    store.put(f"{model}/{POINTER}", json.dumps(body, sort_keys=True).encode())


def read_pointer(store: Store, model: str) -> dict | None:
    key = f"{model}/{POINTER}"
    return json.loads(store.get(key)) if store.exists(key) else None


def fetch_verified(store: Store, manifest_key: str, out: Path | None = None) -> tuple[dict, dict[str, bytes]]:
    """Read a manifest and every file it names, checking size and sha256 before anything is written."""
    try:
        manifest = json.loads(store.get(manifest_key))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"Manifest {manifest_key!r} is not valid JSON ({exc}); expected a shrinkflow manifest.") from None
    prefix = manifest_key.rpartition("/")[0]
    files = {}
    for entry in manifest["files"]:
        data = store.get(f"{prefix}/{entry['path']}" if prefix else entry["path"])
        if len(data) != entry["size"] or sha256(data) != entry["sha256"]:
            raise ArtifactError(f"Object {prefix}/{entry['path']!r} has sha256 {sha256(data)} and {len(data)} bytes; "
                                f"expected {entry['sha256']} and {entry['size']} bytes from the manifest.")
        files[entry["path"]] = data
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest, files


def locate(url: str) -> tuple[Store, str]:
    """The store and key of an object given by its full URL (``s3://bucket/key`` or a local path)."""
    if url.startswith("s3://"):
        bucket, _, key = url[5:].partition("/")
        return S3Store(bucket), key
    path = Path(url.removeprefix("file://"))
    return LocalStore(path.parent), path.name


class StoreCache:
    """A :class:`shrinkflow.cache.BlobCache` in the artifact store, under ``cache/``.

    Workers anywhere read the teacher's weights and outputs by content key from here.
    """

    def __init__(self, store: Store, prefix: str = "cache") -> None:
        self.store, self.prefix = store, prefix

    def get(self, key: str) -> bytes | None:
        full = f"{self.prefix}/{key}"
        return self.store.get(full) if self.store.exists(full) else None

    def put(self, key: str, data: bytes) -> None:
        self.store.put(f"{self.prefix}/{key}", data)
