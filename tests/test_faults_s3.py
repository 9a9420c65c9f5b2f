"""Transient S3 failures are retried with backoff and the work completes; permanent ones fail fast and clearly.
A fault-injecting proxy on loopback sits between the client and the S3 server."""

from __future__ import annotations

import time

import pytest

from rolo_batch import contracts, datasets, storage, tables
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector
from rolo_batch.errors import StorageError, TransientStorageError
from rolo_batch.extract import ExtractOptions, extract_video
from tests.faultproxy import FaultPlan, FaultProxy


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """A fault proxy in front of the S3 server; this process's S3 client goes through it."""
    with FaultProxy(s3_env) as running:
        monkeypatch.setenv("AWS_ENDPOINT_URL", running.url)
        yield running


@pytest.mark.parametrize("plan", [FaultPlan(status=503, fail=4), FaultPlan(status=500, fail=3),
                                  FaultPlan(drop=3)], ids=["503-slow-down", "500-internal", "dropped"])
def test_transient_errors_are_retried_and_the_operations_complete(proxy, bucket, plan):
    proxy.plan = plan
    uri = f"s3://{bucket}/a/b.bin"
    storage.write_bytes(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload"
    assert [e.name for e in storage.list_dir(f"s3://{bucket}/a")] == ["b.bin"]
    assert plan.failed + plan.dropped >= 3, "the proxy injected no faults"


def test_an_outage_longer_than_the_retries_ends_in_a_clear_transient_error(proxy, bucket, monkeypatch):
    proxy.plan = FaultPlan(status=503, always=True)
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match="still failing after"):
        storage.read_bytes(f"s3://{bucket}/missing.bin")
    assert time.monotonic() - started < 120, "the retries did not give up"


def test_access_denied_fails_fast_without_retrying(proxy, bucket):
    proxy.plan = FaultPlan(status=403, always=True)
    started = time.monotonic()
    with pytest.raises(StorageError, match="access denied") as info:
        storage.write_bytes(f"s3://{bucket}/x.bin", b"x")
    assert not isinstance(info.value, TransientStorageError)
    assert proxy.plan.requests <= 3 and time.monotonic() - started < 10


def test_extraction_through_a_flaky_store_completes_with_every_row_once(proxy, bucket, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)  # set the input up without faults
    synthesize(f"s3://{bucket}/videos", SynthConfig(videos=1, frames=20, width=96, height=72, seed=3))
    ref = datasets.discover(f"s3://{bucket}/videos").videos[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.plan = FaultPlan(status=503, every=5)  # every fifth request fails
    root = f"s3://{bucket}/features"
    result = extract_video(build_detector("yolo-tiny", random_init=True), ref, root, ExtractOptions(batch_size=4))
    assert result.frames == 20 and proxy.plan.failed >= 3
    table = tables.read_parquet(storage.join(tables.unit_uri(root, ref.name), tables.PART_FILE),
                                contracts.load("features"))
    assert sorted(table.column("frame").to_pylist()) == list(range(1, 21))
