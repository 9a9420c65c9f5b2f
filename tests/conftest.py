"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode), buckets, and the data the
tests write. Everything binds to 127.0.0.1: tests talk to no other address."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.ports import free_port, wait_for_port

# With the pinned Ray on Linux, this makes a local Ray use 127.0.0.1 instead of the routable address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real OTB sequences live beside the checkout (CI has them there too); ROLO_OTB_SAMPLES overrides.
OTB_SAMPLES = Path(os.environ.get("ROLO_OTB_SAMPLES", REPO_ROOT.parent / "shared" / "data" / "otb-samples"))


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """A moto S3 server on a free loopback port, for the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3_env(s3_endpoint):
    """The standard AWS variables pointing at the loopback server, set for the session (and for any Ray
    started after this fixture, whose workers inherit them). Restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield s3_endpoint


@pytest.fixture(scope="session")
def s3_client(s3_env):
    """A boto3 client for the loopback server: an independent way to set up and check what landed."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client) -> str:
    """A new, empty bucket; returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    """A writable root URI, once on local disk and once on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket_name = request.getfixturevalue("bucket")
    return f"s3://{bucket_name}/root"


@pytest.fixture(scope="session")
def otb_samples() -> Path:
    """The three real OTB sequences shipped beside the project (read-only)."""
    if not OTB_SAMPLES.is_dir():
        pytest.skip(f"real OTB samples not found at {OTB_SAMPLES}")
    return OTB_SAMPLES


@pytest.fixture(scope="session")
def ray_local(s3_env):
    """One local Ray for the whole session, bound to 127.0.0.1, with 2 logical GPUs (for pinning tests on
    a machine without any). Started after the S3 variables are set, so its workers inherit them."""
    import ray

    from rolo_batch.runtime import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(address="local", num_cpus=4, num_gpus=2)
    yield ray
    ray.shutdown()


from tests.rayhead import cluster_env, ray_head  # noqa: E402,F401  (session fixtures: a real Ray head)
