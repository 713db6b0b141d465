"""Content-addressed caches: every blob carries its sha256; corrupt or truncated ones are refused."""

import pytest
import torch

from shrinkflow import cache
from shrinkflow.errors import ArtifactError
from shrinkflow.workloads import digits


def test_dir_cache_round_trip_and_checksum(tmp_path):
    c = cache.DirCache(tmp_path)
    c.put("a/b.pt", cache.dumps({"w": torch.arange(4.0)}))
    assert torch.equal(cache.loads(c.get("a/b.pt"))["w"], torch.arange(4.0))
    assert c.get("missing") is None
    raw = (tmp_path / "a" / "b.pt").read_bytes()
    (tmp_path / "a" / "b.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match=r"'a/b.pt' is corrupt or truncated.*expected [0-9a-f]{64}"):
        c.get("a/b.pt")


def test_a_flipped_byte_is_caught(tmp_path):
    c = cache.DirCache(tmp_path)
    c.put("k", b"0123456789" * 10)
    path = tmp_path / "k"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        c.get("k")


def test_unloadable_payload_names_what_it_was():
    with pytest.raises(ArtifactError, match=r"teacher checkpoint 'x' cannot be loaded .*weights_only=True"):
        cache.loads(b"PK\x03\x04 not a zip", "teacher checkpoint 'x'")


def test_corrupt_teacher_checkpoint_is_a_clear_error_not_a_retrain(tmp_path):
    c = cache.DirCache(tmp_path)
    train, val, _ = digits.splits(0)
    key = f"teachers/digits-v{digits.ARCH_VERSION}-seed0.pt"
    c.put(key, cache.dumps(digits.DigitsCNN().state_dict()))
    (tmp_path / key).write_bytes((tmp_path / key).read_bytes()[:-100])  # truncated on disk
    with pytest.raises(ArtifactError, match="teachers/digits-v.*-seed0.pt' is corrupt or truncated"):
        digits.teacher(train, val, 0, c)
    c.put(key, b"\x80\x04 a pickle, not a state dict", replace=True)  # sealed, so it passes the checksum but not the loader
    with pytest.raises(ArtifactError, match="teacher checkpoint .* cannot be loaded"):
        digits.teacher(train, val, 0, c)
