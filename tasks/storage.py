"""The artifact store (a local directory or S3 through boto3) and checksummed manifests.

A promoted version is written under its own prefix (``MODEL/vN/``) as: every file, each read
back and verified (size and sha256), then ``manifest.json`` last, created only if absent; a
manifest therefore never names a file that is not there, and is never rewritten. The model's
``champion.json`` pointer moves by compare-and-swap: S3 conditional writes (``IfNoneMatch`` to
create it, ``IfMatch`` on the ETag that was read to move it), or a file lock on a local store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shrinkflow.cache import seal, unseal
from shrinkflow.errors import ArtifactError

MANIFEST = "manifest.json"
POINTER = "champion.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Conflict(ArtifactError):
    """A conditional write lost: the object was created or changed since it was read."""


class Missing(ArtifactError):
    """The object is not in the store."""


class Store(Protocol):
    uri: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def url(self, key: str) -> str: ...
    def read(self, key: str) -> tuple[bytes, str] | None: ...
    def put_if(self, key: str, data: bytes, etag: str | None) -> str: ...
    def delete_if(self, key: str, etag: str) -> None: ...


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
            raise Missing(f"Object {key!r} is missing from store {self.uri!r}.") from None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def url(self, key: str) -> str:
        return str(self._path(key))

    def read(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version tag (its sha256), or None if absent."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, sha256(data)

    @contextlib.contextmanager
    def _locked(self, key: str):
        lock = self._path(key).with_name(self._path(key).name + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # every writer on this host (threads, processes) queues here
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Write only if the object is absent (``etag=None``) or still has ``etag``; returns the new tag."""
        with self._locked(key):
            current = self.read(key)
            if (current is None) != (etag is None) or (current is not None and current[1] != etag):
                raise Conflict(f"Object {key!r} in store {self.uri!r} changed since it was read "
                               f"(expected {'absent' if etag is None else 'version ' + etag[:12]}).")
            self.put(key, data)
            return sha256(data)

    def delete_if(self, key: str, etag: str) -> None:
        """Delete the object only if it still has ``etag``."""
        with self._locked(key):
            current = self.read(key)
            if current is None or current[1] != etag:
                raise Conflict(f"Object {key!r} in store {self.uri!r} changed since it was written; not deleted.")
            self._path(key).unlink()


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

    @contextlib.contextmanager
    def _op(self, what: str, key: str):
        """Turn an unreachable endpoint or an S3 error into an ArtifactError saying what failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise Conflict(f"Object {self.url(key)!r} changed since it was read ({code}); {what} was not applied.") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise Missing(f"Object {key!r} is missing from store {self.uri!r}.") from None
            raise ArtifactError(f"S3 refused to {what} {self.url(key)!r}: {code}: {exc.response.get('Error', {}).get('Message', '')}") from None
        except BotoCoreError as exc:
            endpoint = self.client.meta.endpoint_url
            raise ArtifactError(f"S3 endpoint {endpoint} failed while trying to {what} {self.url(key)!r}: {exc}") from None

    def put(self, key: str, data: bytes) -> None:
        with self._op("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        with self._op("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def read(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag, or None if absent."""
        try:
            with self._op("read", key):
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                return obj["Body"].read(), obj["ETag"]
        except Missing:
            return None

    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Conditional write: create only if absent (``etag=None``), else only if the ETag still matches."""
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        with self._op("conditionally write", key):
            return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **cond)["ETag"]

    def delete_if(self, key: str, etag: str) -> None:
        """Delete the object only if its ETag still matches (S3 conditional delete)."""
        with self._op("conditionally delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=etag)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._op("check", key):
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
    """Write ``files`` under the version's prefix, verify each, then create the manifest. Returns its key.

    A version's manifest is immutable: if one is there already (a re-run, or a racing promotion
    of the same version) it is verified against ``files`` and reused, never overwritten.
    """
    prefix = version_prefix(model, version)
    key = f"{prefix}/{MANIFEST}"
    if store.exists(key):
        existing, _ = fetch_verified(store, key)
        want = {name: sha256(data) for name, data in files.items()}
        have = {e["path"]: e["sha256"] for e in existing["files"]}
        if have != want:
            raise ArtifactError(f"Manifest {store.url(key)!r} already exists with other files {have}; expected {want}. "
                                f"A published version is immutable.")
        return key
    entries = []
    for name, data in sorted(files.items()):
        obj = f"{prefix}/{name}"
        store.put(obj, data)
        back = store.get(obj)
        if len(back) != len(data) or sha256(back) != sha256(data):
            raise ArtifactError(f"Object {obj!r} read back {len(back)} bytes with another checksum; expected {len(data)} bytes, sha256 {sha256(data)}.")
        entries.append({"path": name, "sha256": sha256(data), "size": len(data)})
    manifest = {"schema": 1, "model": model, "version": str(version), "files": entries} | fields
    try:
        store.put_if(key, json.dumps(manifest, indent=2, sort_keys=True).encode(), None)
    except Conflict:  # the same version published concurrently: keep that one if it holds the same files
        return publish(store, model, version, files, fields)
    return key


def pointer_body(store: Store, model: str, version: str | int, manifest_key: str) -> bytes:
    return json.dumps({"version": str(version), "manifest": manifest_key,
                       "manifest_sha256": sha256(store.get(manifest_key))}, sort_keys=True).encode()


def swap_pointer(store: Store, model: str, body: bytes, etag: str | None) -> str:
    """Move the champion pointer from the state read (``etag``; None: no pointer yet) to ``body``.

    Raises :class:`Conflict` if another promotion moved it in the meantime. Returns the new ETag.
    """
    return store.put_if(f"{model}/{POINTER}", body, etag)


def read_pointer_tagged(store: Store, model: str) -> tuple[dict | None, str | None]:
    """The champion pointer and its ETag (for :func:`swap_pointer`), or (None, None)."""
    found = store.read(f"{model}/{POINTER}")
    if found is None:
        return None, None
    try:
        return json.loads(found[0]), found[1]
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"Champion pointer {store.url(f'{model}/{POINTER}')!r} is not valid JSON ({exc}).") from None


def read_pointer(store: Store, model: str) -> dict | None:
    return read_pointer_tagged(store, model)[0]


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
        found = self.store.read(full)  # one request: absent, or the bytes
        return unseal(self.store.url(full), found[0]) if found is not None else None

    def put(self, key: str, data: bytes, replace: bool = False) -> bool:
        """Create-if-absent (S3 ``If-None-Match``): the first of two racing workers stores the blob."""
        full = f"{self.prefix}/{key}"
        if replace:
            self.store.put(full, seal(data))
            return True
        try:
            self.store.put_if(full, seal(data), None)
            return True
        except Conflict:
            return False
