"""Content-addressed blob caches for teacher weights and teacher outputs.

The core needs only ``get``/``put`` of bytes by key; the orchestration layer passes a cache
backed by the artifact store (local directory or S3), so workers on other machines read the
same teacher and outputs by key instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from shrinkflow.errors import ArtifactError

#: Every cached blob starts with this tag and the sha256 of its payload, so that a truncated or
#: corrupted object (a torn write, a bad disk, a store returning the wrong bytes) is refused
#: with a clear error instead of being loaded.
MAGIC = b"SFB1"
_HEADER = len(MAGIC) + 32


def seal(data: bytes) -> bytes:
    return MAGIC + hashlib.sha256(data).digest() + data


def unseal(key: str, blob: bytes) -> bytes:
    """The payload of a sealed blob, after checking its sha256; raises ArtifactError otherwise."""
    if len(blob) < _HEADER or not blob.startswith(MAGIC):
        raise ArtifactError(f"Cached object {key!r} ({len(blob)} bytes) has no shrinkflow checksum header; expected "
                            f"a blob written by shrinkflow's cache. Delete it to have it recomputed.")
    digest, payload = blob[len(MAGIC):_HEADER], blob[_HEADER:]
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"Cached object {key!r} is corrupt or truncated: sha256 {hashlib.sha256(payload).hexdigest()} "
                            f"over {len(payload)} bytes; expected {digest.hex()}. Delete it to have it recomputed.")
    return payload


class BlobCache(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes, replace: bool = False) -> bool:
        """Store ``data`` under ``key``. Content-addressed, so the first writer wins: returns False
        (and writes nothing) if ``key`` exists already, unless ``replace`` (for a refused, corrupt blob)."""
        ...


class DirCache:
    """A cache in a local directory; writes are atomic (temp file, then rename), reads checked."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        return unseal(key, path.read_bytes()) if path.exists() else None

    def put(self, key: str, data: bytes, replace: bool = False) -> bool:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(seal(data))
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic create-if-absent: a racing writer's blob is kept, not overwritten
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)


def dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(data: bytes, what: str = "cached object") -> object:
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad archives
        raise ArtifactError(f"{what} cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); expected a tensor/state-dict archive.") from None
