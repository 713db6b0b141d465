"""The local artifact store and manifests: files first and verified, manifest last, tampering refused."""

import json
import threading

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
    storage.swap_pointer(store, "m", storage.pointer_body(store, "m", 2, key), None)
    assert storage.read_pointer(store, "m")["version"] == "2"
    located, name = storage.locate(store.url(key))
    assert name == "manifest.json" and json.loads(located.get(name))["version"] == "2"


def test_keys_cannot_escape_the_store(tmp_path):
    with pytest.raises(ArtifactError, match="escapes the store root"):
        storage.LocalStore(tmp_path / "store").put("../outside", b"x")


def test_pointer_compare_and_swap_lets_exactly_one_racer_win(tmp_path):
    store = storage.LocalStore(tmp_path / "store")
    first = storage.publish(store, "m", 1, {"model.pt2.xz": b"one"}, {})
    etag = storage.swap_pointer(store, "m", storage.pointer_body(store, "m", 1, first), None)
    with pytest.raises(storage.Conflict):  # create-only: a pointer exists
        storage.swap_pointer(store, "m", storage.pointer_body(store, "m", 1, first), None)
    bodies = {v: storage.pointer_body(store, "m", v, storage.publish(store, "m", v, {"model.pt2.xz": str(v).encode()}, {}))
              for v in range(2, 10)}
    start, won, lost = threading.Barrier(len(bodies)), [], []

    def racer(version: int) -> None:
        start.wait()
        try:
            storage.swap_pointer(store, "m", bodies[version], etag)  # all read the same pointer
            won.append(version)
        except storage.Conflict:
            lost.append(version)

    threads = [threading.Thread(target=racer, args=(v,)) for v in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == len(bodies) - 1
    assert storage.read_pointer(store, "m")["version"] == str(won[0])


def test_published_version_is_immutable_and_republishing_is_a_no_op(tmp_path):
    store = storage.LocalStore(tmp_path / "store")
    key = storage.publish(store, "m", 1, {"model.pt2.xz": b"same"}, {"created": "t0"})
    before = store.get(key)
    assert storage.publish(store, "m", 1, {"model.pt2.xz": b"same"}, {"created": "t1"}) == key
    assert store.get(key) == before  # the manifest was reused, not rewritten
    with pytest.raises(ArtifactError, match="immutable"):
        storage.publish(store, "m", 1, {"model.pt2.xz": b"other"}, {})
    assert store.get(key) == before


def test_conditional_delete_only_removes_the_version_read(tmp_path):
    store = storage.LocalStore(tmp_path / "store")
    etag = store.put_if("m/champion.json", b"a", None)
    store.put("m/champion.json", b"b")
    with pytest.raises(storage.Conflict):
        store.delete_if("m/champion.json", etag)
    store.delete_if("m/champion.json", store.read("m/champion.json")[1])
    assert store.read("m/champion.json") is None


def test_store_cache_refuses_corrupt_and_truncated_blobs(tmp_path):
    store = storage.LocalStore(tmp_path / "store")
    cache = storage.StoreCache(store)
    cache.put("teachers/t.pt", b"weights" * 100)
    assert cache.get("teachers/t.pt") == b"weights" * 100
    sealed = store.get("cache/teachers/t.pt")
    store.put("cache/teachers/t.pt", sealed[:-10])  # truncated
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        cache.get("teachers/t.pt")
    store.put("cache/teachers/t.pt", b"not a shrinkflow blob")
    with pytest.raises(ArtifactError, match="no shrinkflow checksum header"):
        cache.get("teachers/t.pt")
