"""Hub types round-trip through contract-checked Parquet, locally and on S3, atomically."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from rolo_batch import contracts, storage, tables
from rolo_batch.errors import InputError, StorageError


def make_features(video="v1", n=5, dim=8, seed=0) -> tables.FeatureFrames:
    rng = np.random.default_rng(seed)
    detections = [rng.random((k, 6)).astype(np.float32) for k in [0, 1, 3, 2, 0][:n]] + \
        [rng.random((1, 6)).astype(np.float32) for _ in range(max(0, n - 5))]
    for d in detections:
        d[:, 0] = rng.integers(0, 20, len(d))  # class ids are integers
    gt = rng.random((n, 4)).astype(np.float32) * 100
    gt[1] = np.nan
    return tables.FeatureFrames(
        video=video, frame=np.arange(3, 3 + n), image_wh=np.tile([320, 240], (n, 1)),
        feature=rng.random((n, dim)).astype(np.float32), detection=rng.random((n, 6)).astype(np.float32),
        detections=detections, gt_boxes_xywh_px=gt, gt_valid=np.isfinite(gt).all(axis=1))


def test_feature_frames_round_trip_through_parquet(store_root):
    original = make_features()
    uri = storage.join(store_root, "features", "video=v1", tables.PART_FILE)
    tables.write_parquet(uri, original.to_arrow(), contracts.load("features"),
                         {"rolo_batch.detector_id": "tiny-123"})
    table = tables.read_parquet(uri, contracts.load("features"), feature_dim=8)
    back = tables.FeatureFrames.from_arrow(table)
    assert back.video == "v1"
    np.testing.assert_array_equal(back.frame, original.frame)
    np.testing.assert_allclose(back.feature, original.feature, atol=1e-3)  # stored as float16
    np.testing.assert_array_equal(back.detection, original.detection)
    assert [len(d) for d in back.detections] == [0, 1, 3, 2, 0]
    for a, b in zip(back.detections, original.detections):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(back.gt_boxes_xywh_px[1]).all() and not back.gt_valid[1]
    np.testing.assert_array_equal(back.gt_boxes_xywh_px[[0, 2, 3, 4]], original.gt_boxes_xywh_px[[0, 2, 3, 4]])
    assert table.column("gt_box_xywh_px").null_count == 1
    assert tables.read_schema(uri).metadata[b"rolo_batch.detector_id"] == b"tiny-123"


def test_feature_frames_reject_inconsistent_shapes():
    good = make_features()
    with pytest.raises(ValueError, match="detection has shape"):
        tables.FeatureFrames(**{**good.__dict__, "detection": np.zeros((4, 6))})


def test_track_rows_round_trip_with_missing_boxes(store_root):
    rows = [tables.TrackRows("v", m, np.arange(1, 5), np.array([[1, 2, 3, 4], [np.nan] * 4, [2, 3, 4, 5],
                                                                  [3, 4, 5, 6]], float),
                             confidence=np.array([1, np.nan, .5, .2]), time_ms=np.array([1, 2, 3, 4.0]))
            for m in ("yolo", "rolo")]
    import pyarrow as pa
    uri = storage.join(store_root, "tracks.parquet")
    tables.write_parquet(uri, pa.concat_tables([r.to_arrow() for r in rows]), contracts.load("tracks"))
    back = tables.TrackRows.from_arrow(tables.read_parquet(uri, contracts.load("tracks")))
    assert [(r.video, r.method) for r in back] == [("v", "rolo"), ("v", "yolo")]
    np.testing.assert_array_equal(np.isnan(back[0].boxes_xywh_px).all(axis=1), [False, True, False, False])
    np.testing.assert_allclose(back[0].confidence, [1, np.nan, .5, .2])


def test_streaming_writer_writes_row_groups_and_publishes_on_close(tmp_path):
    uri = str(tmp_path / "video=v1" / tables.PART_FILE)
    contract = contracts.load("features")
    with tables.ParquetUnitWriter(uri, contract, feature_dim=8) as writer:
        writer.write(make_features(n=5, seed=1).to_arrow())
        assert not storage.exists(uri)
        writer.write(make_features(n=5, seed=2).to_arrow())
    assert writer.rows == 10
    assert pq.ParquetFile(uri).num_row_groups == 2


def test_streaming_writer_publishes_nothing_on_error(tmp_path):
    uri = str(tmp_path / "video=v1" / tables.PART_FILE)
    with pytest.raises(RuntimeError):
        with tables.ParquetUnitWriter(uri, contracts.load("features"), feature_dim=8) as writer:
            writer.write(make_features().to_arrow())
            raise RuntimeError("decoder died")
    assert list((tmp_path / "video=v1").iterdir()) == []


def test_writer_refuses_rows_of_the_wrong_feature_size(tmp_path):
    with pytest.raises(InputError, match="feature"):
        with tables.ParquetUnitWriter(str(tmp_path / "x.parquet"), contracts.load("features"),
                                      feature_dim=16) as writer:
            writer.write(make_features(dim=8).to_arrow())
    assert not (tmp_path / "x.parquet").exists()


def test_done_units_lists_only_finished_videos(store_root):
    contract = contracts.load("features")
    for video, done in (("a", True), ("b", False), ("c", True)):
        unit = tables.unit_uri(store_root, video)
        tables.write_parquet(storage.join(unit, tables.PART_FILE), make_features(video).to_arrow(), contract)
        if done:
            storage.mark_done(unit, {"rows": 5})
    assert sorted(tables.done_units(store_root)) == ["a", "c"]
    assert [storage.basename(storage.join(f, "..")) for f in tables.table_files(store_root)]
    assert len(tables.table_files(store_root)) == 2


def test_table_files_of_an_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="no finished per-video units"):
        tables.table_files(str(tmp_path))


def test_reading_something_that_is_not_parquet_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet.*not a readable Parquet"):
        tables.read_parquet(str(bad), contracts.load("tracks"))
