"""The local artifact store and manifests: files first and verified, manifest last, tampering refused."""

import json

import pytest

from shrinkflow.errors import ArtifactError
from tasks import storage


def test_publish_then_fetch_verifies_every_file(tmp_path):
    store = storage.LocalStore(tmp_path / "store")
    key = storage.publish(store, "m", 3, {"model.pt2.xz": b"abc" * 100, "tokenizer.json": b"{}"}, {"metrics": {"q": 1}})
    assert key == "m/v3/manifest.json"
    manifest = json.loads(store.get(key))
    assert [f["path"] for f in manifest["files"]] == ["model.pt2.xz", "tokenizer.json"]
    assert manifest["files"][0]["size"] == 300 and manifest["metrics"] == {"q": 1}
    got, files = storage.fetch_verified(store, key, tmp_path / "out")
    assert files["model.pt2.xz"] == b"abc" * 100 and (tmp_path / "out" / "manifest.json").exists()


def test_tampered_object_is_refused_and_nothing_written(tmp_path):
    store = storage.LocalStore(tmp_path / "store")
    key = storage.publish(store, "m", 1, {"model.pt2.xz": b"good bytes"}, {})
    store.put("m/v1/model.pt2.xz", b"evil bytes")  # same size, other content
    with pytest.raises(ArtifactError, match="expected .* from the manifest"):
        storage.fetch_verified(store, key, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pointer_and_locate(tmp_path):
    store = storage.LocalStore(tmp_path / "store")
    key = storage.publish(store, "m", 2, {"model.pt2.xz": b"x"}, {})
    storage.set_pointer(store, "m", 2, key)
    assert storage.read_pointer(store, "m")["version"] == "2"
    located, name = storage.locate(store.url(key))
    assert name == "manifest.json" and json.loads(located.get(name))["version"] == "2"


def test_keys_cannot_escape_the_store(tmp_path):
    with pytest.raises(ArtifactError, match="escapes the store root"):
        storage.LocalStore(tmp_path / "store").put("../outside", b"x")
