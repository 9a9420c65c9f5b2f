"""End to end on a real Ray head (loopback, token auth): extract -> train -> track -> score submitted as Ray
Jobs with `rolo-batch submit`, from an input bucket to an output bucket on the loopback S3 server."""

from __future__ import annotations

import pytest

from rolo_batch import cli
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector, save_detector

ENV = ["--env", "AWS_ENDPOINT_URL", "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY",
       "--env", "AWS_DEFAULT_REGION"]


def submit(*stage: str) -> int:
    return cli.main(["submit", "--wait", "--timeout", "300", *ENV, "--", *stage])


@pytest.mark.timeout(900)
def test_the_pipeline_as_ray_jobs_from_bucket_to_bucket(cluster_env, s3_env, s3_client, capsys):
    s3_client.create_bucket(Bucket="e2e-videos")
    s3_client.create_bucket(Bucket="e2e-results")
    synthesize("s3://e2e-videos/otb", SynthConfig(videos=2, frames=12, width=96, height=72, seed=21))
    save_detector(build_detector("yolo-tiny", random_init=True, seed=2), "s3://e2e-videos/detector.pt")
    out = "s3://e2e-results/run"

    steps = [
        ("extract", "s3://e2e-videos/otb", out, "--weights", "s3://e2e-videos/detector.pt"),
        ("train", out, out, "--steps", "3", "--epochs", "2", "--hidden", "16", "--projection", "16",
         "--gpu", "off"),
        ("track", out, f"{out}/models/rolo/model.pt", out, "--methods", "rolo", "yolo", "kcf", "--gpu", "off"),
        ("score", f"{out}/tracks/rolo", "s3://e2e-videos/otb", out),
    ]
    for stage in steps:
        code = submit(*stage)
        printed = capsys.readouterr().out
        assert code == 0, f"{stage[0]} job failed:\n{printed[-3000:]}"
        assert "SUCCEEDED" in printed.strip().splitlines()[-1]

    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="e2e-results")["Contents"]}
    for name in ("scores.parquet", "report.md", "success.png", "precision.png"):
        assert f"run/scores/rolo/{name}" in keys, name
    assert "run/models/rolo/model.pt" in keys
    report = s3_client.get_object(Bucket="e2e-results", Key="run/scores/rolo/report.md")["Body"].read().decode()
    for method in ("rolo", "yolo", "kcf"):
        assert f"| {method} |" in report


@pytest.mark.timeout(300)
def test_a_job_with_bad_credentials_fails_with_a_clear_error(cluster_env, s3_env, s3_client, monkeypatch, capsys):
    """moto accepts any key, so 'bad credentials' here is a store that refuses them: an endpoint that is down."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    code = submit("inspect", "s3://e2e-anything/videos")
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in printed.strip().splitlines()[-1]
    assert "storage error" in printed and "s3://e2e-anything" in printed
