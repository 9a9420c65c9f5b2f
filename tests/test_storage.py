"""Storage against local disk and a real S3-compatible server on loopback."""

from __future__ import annotations

import threading

import pytest

from rolo_batch import storage
from rolo_batch.errors import StorageError, TransientStorageError


def test_resolve_local_paths_and_file_uris(tmp_path):
    by_path = storage.resolve(str(tmp_path / "a"))
    by_uri = storage.resolve(f"file://{tmp_path}/a")
    assert by_path.is_local and by_uri.is_local
    assert by_path.path == by_uri.path == str(tmp_path / "a")


def test_resolve_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("out/x").path == str(tmp_path / "out" / "x")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://example.com/x", "hdfs://nn/x", "ftp://h/x"])
def test_unsupported_schemes_are_refused_with_the_supported_ones_named(uri):
    with pytest.raises(StorageError, match=r"unsupported URI scheme.*s3://"):
        storage.resolve(uri)


def test_s3_uri_needs_a_bucket():
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.resolve("s3:///key")


def test_join_and_basename():
    assert storage.join("s3://b/out/", "features", "/x/") == "s3://b/out/features/x"
    assert storage.basename("s3://b/out/video=a/") == "video=a"


def test_write_read_list_overwrite(store_root):
    target = storage.join(store_root, "dir", "a.txt")
    storage.write_text(target, "first")
    storage.write_text(storage.join(store_root, "dir", "sub", "b.txt"), "bee")
    assert storage.read_text(target) == "first"
    storage.write_text(target, "second, longer")
    assert storage.read_text(target) == "second, longer"

    top = storage.list_dir(storage.join(store_root, "dir"))
    assert [(e.name, e.is_dir) for e in top] == [("a.txt", False), ("sub", True)]
    assert top[0].size == len("second, longer")
    deep = storage.list_dir(storage.join(store_root, "dir"), recursive=True)
    assert [e.uri for e in deep if not e.is_dir] == [target, storage.join(store_root, "dir", "sub", "b.txt")]
    assert storage.exists(target) and storage.is_file(target) and not storage.is_file(storage.join(store_root, "dir"))


def test_s3_writes_land_in_the_bucket(bucket, s3_client):
    storage.write_bytes(f"s3://{bucket}/p/x.bin", b"\x00\x01payload")
    body = s3_client.get_object(Bucket=bucket, Key="p/x.bin")["Body"].read()
    assert body == b"\x00\x01payload"


def test_failed_atomic_write_leaves_nothing_and_keeps_the_old_file(store_root):
    target = storage.join(store_root, "unit", "data.bin")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_output(target) as stream:
            stream.write(b"half of the new")
            raise RuntimeError("boom")
    assert storage.read_bytes(target) == b"old"
    names = [e.name for e in storage.list_dir(storage.join(store_root, "unit"))]
    assert names == ["data.bin"], "the temporary file must be removed"


def test_readers_never_see_a_partial_file(store_root):
    target = storage.join(store_root, "big.bin")
    inside = threading.Event()
    with storage.atomic_output(target) as stream:
        stream.write(b"x" * 1_000_000)
        inside.set()
        assert not storage.exists(target), "the file is visible before the write completed"
        visible = [e.name for e in storage.list_dir(store_root, missing_ok=True)]
        assert all(name.startswith(".") for name in visible), visible
    assert storage.read_bytes(target) == b"x" * 1_000_000


def test_done_markers(store_root):
    unit = storage.join(store_root, "video=a")
    assert not storage.is_done(unit) and storage.read_done(unit) is None
    storage.write_text(storage.join(unit, "part-0.parquet"), "data")
    storage.mark_done(unit, {"rows": 3})
    assert storage.is_done(unit)
    assert storage.read_done(unit) == {"rows": 3}


def test_missing_directory(store_root):
    with pytest.raises(StorageError, match="no such directory"):
        storage.list_dir(storage.join(store_root, "nope"))
    assert storage.list_dir(storage.join(store_root, "nope"), missing_ok=True) == []


def test_missing_file_is_a_clear_error(store_root):
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(storage.join(store_root, "nope.txt"))


@pytest.mark.parametrize("operation", ["write", "read", "list", "ensure_dir"])
def test_missing_bucket_fails_fast_with_a_clear_error(s3_env, operation):
    uri = "s3://no-such-bucket-for-rolo/x/y.txt"
    calls = {
        "write": lambda: storage.write_text(uri, "x"),
        "read": lambda: storage.read_text(uri),
        "list": lambda: storage.list_dir("s3://no-such-bucket-for-rolo/x"),
        "ensure_dir": lambda: storage.ensure_dir("s3://no-such-bucket-for-rolo/x"),
    }
    with pytest.raises(StorageError) as info:
        calls[operation]()
    assert not isinstance(info.value, TransientStorageError)
    assert "no-such-bucket-for-rolo" in str(info.value)
    if operation != "read":  # a GET on a missing bucket reads as "not found" to the S3 client
        assert "bucket does not exist" in str(info.value)


def test_delete_file_and_tree(store_root):
    storage.write_text(storage.join(store_root, "t", "a"), "a")
    storage.write_text(storage.join(store_root, "t", "b", "c"), "c")
    storage.delete(storage.join(store_root, "t", "a"))
    assert not storage.exists(storage.join(store_root, "t", "a"))
    storage.delete(storage.join(store_root, "t"))
    assert storage.list_dir(storage.join(store_root, "t"), missing_ok=True) == []


def test_retrying_retries_transient_errors_then_succeeds():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientStorageError("s3://b/k", "503 slow down")
        return "ok"

    assert storage.retrying(flaky, what="test", base_delay_s=0.001) == "ok"
    assert len(attempts) == 3


def test_retrying_gives_up_and_does_not_retry_permanent_errors():
    attempts = []

    def denied():
        attempts.append(1)
        raise StorageError("s3://b/k", "access denied")

    with pytest.raises(StorageError, match="access denied"):
        storage.retrying(denied, what="test", base_delay_s=0.001)
    assert len(attempts) == 1

    def always_busy():
        raise TransientStorageError("s3://b/k", "503")

    with pytest.raises(TransientStorageError, match="after 3 attempts"):
        storage.retrying(always_busy, what="reading", attempts=3, base_delay_s=0.001)


def test_storage_errors_survive_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(TransientStorageError("s3://b/k", "busy")))
    assert isinstance(error, TransientStorageError) and error.uri == "s3://b/k" and error.reason == "busy"
