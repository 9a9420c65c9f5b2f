"""Credentials never reach output, files or reports, and names from listings cannot escape the output root."""

from __future__ import annotations

import os

import pytest

from rolo_batch import cli, storage, tables
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector, save_detector
from rolo_batch.errors import InputError
from rolo_batch.rolo import RoloConfig, build_model, export_model


def all_objects(s3_client, bucket: str) -> dict[str, bytes]:
    listing = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


@pytest.mark.timeout(600)
def test_credentials_appear_in_no_output_file_or_report(ray_local, bucket, s3_client, capsys):
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    root = f"s3://{bucket}"
    synthesize(f"{root}/videos", SynthConfig(videos=2, frames=6, width=96, height=72, seed=2))
    save_detector(build_detector("yolo-tiny", random_init=True), f"{root}/detector.pt")
    assert cli.main(["extract", f"{root}/videos", f"{root}/out", "--weights", f"{root}/detector.pt"]) == 0
    table = tables.FeaturesTable.open(f"{root}/out")
    export_model(build_model(RoloConfig(feature_dim=table.feature_dim, steps=2, hidden_size=8, projection_size=8,
                                        detector_id=table.detector_id)), f"{root}/model.pt", split="exp2")
    assert cli.main(["track", f"{root}/out", f"{root}/model.pt", f"{root}/out", "--methods", "rolo", "yolo",
                     "--gpu", "off"]) == 0
    assert cli.main(["score", f"{root}/out/tracks/rolo", f"{root}/videos", f"{root}/out"]) == 0
    assert cli.main(["inspect", "s3://no-such-bucket-here/videos"]) == 1  # errors too
    printed = "".join(capsys.readouterr())
    files = all_objects(s3_client, bucket)
    assert any(key.endswith("report.md") for key in files) and any(key.endswith("_done.json") for key in files)
    for secret in secrets:
        assert secret not in printed
        leaked = [key for key, body in files.items() if secret.encode() in body]
        assert not leaked, f"credentials written into {leaked}"


@pytest.mark.parametrize("name", ["x y", "-rf", "a;rm", "a..b"])
def test_unit_names_read_from_a_listing_cannot_lead_outside_the_root(tmp_path, name):
    # a crafted listing: a unit directory whose name is not a safe video name, marked done
    unit = tmp_path / "table" / name
    unit.mkdir(parents=True, exist_ok=True)
    storage.mark_done(str(unit), {})
    with pytest.raises(InputError, match="not allowed"):
        tables.done_units(str(tmp_path / "table"))


@pytest.mark.parametrize("name", [".hidden", "_reserved"])
def test_hidden_and_reserved_folders_of_a_table_are_not_units(tmp_path, name):
    for unit_name in (name, "good"):
        unit = tmp_path / "table" / unit_name
        unit.mkdir(parents=True)
        storage.mark_done(str(unit), {})
    assert list(tables.done_units(str(tmp_path / "table"))) == ["good"]
