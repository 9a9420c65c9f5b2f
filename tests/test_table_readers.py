"""The per-video tables open as they are in the usual PyData readers, with the contract's columns and types.

Both tables are written by the stages' own writers (features units, and tracks units with heatmaps beside the
rows). A video called ``0001`` catches readers that infer a number from a folder name.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from rolo_batch import storage, tables
from rolo_batch.errors import InputError
from rolo_batch.synthetic_features import IMAGE_WH, synthetic_feature_frames
from rolo_batch.track import write_video_tracks

VIDEOS = ("0001", "Car4")
FRAMES = 12


@pytest.fixture(scope="module")
def features_root(tmp_path_factory) -> str:
    from rolo_batch import contracts

    root = str(tmp_path_factory.mktemp("features") / "det-0000")
    for i, name in enumerate(VIDEOS):
        rows = synthetic_feature_frames(name, FRAMES, 8, seed=i)
        unit = tables.unit_uri(root, name)
        tables.write_parquet(storage.join(unit, tables.PART_FILE), rows.to_arrow(), contracts.load("features"),
                             tables.features_metadata("det-0000", rows.feature_dim))
        storage.mark_done(unit, tables.features_marker(name, rows.frame, "det-0000", rows.feature_dim, IMAGE_WH))
    return root


@pytest.fixture(scope="module")
def tracks_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tracks") / "run")
    frame = np.arange(1, FRAMES + 1)
    for name in VIDEOS:
        boxes = np.tile([10.0, 20.0, 30.0, 40.0], (FRAMES, 1))
        boxes[3] = np.nan  # a frame where the method reports nothing
        rows = [tables.TrackRows(video=name, method=m, frame=frame, boxes_xywh_px=boxes) for m in ("rolo", "yolo")]
        heatmaps = np.zeros((FRAMES, 32, 32), np.float16)  # a side file in the unit, as the heatmap model writes
        write_video_tracks(root, name, rows, heatmaps, {"model": "m"})
    return root


def test_pandas_reads_the_features_folder(features_root):
    frame = pd.read_parquet(features_root)
    assert len(frame) == FRAMES * len(VIDEOS)
    assert sorted(frame["video"].unique()) == sorted(VIDEOS)
    assert frame["video"].map(type).eq(str).all()
    assert str(frame["frame"].dtype) == "int32"
    assert len(frame["feature"].iloc[0]) == 8
    assert {"image_width", "detection", "detections", "gt_box_xywh_px", "gt_valid"} <= set(frame.columns)


def test_pandas_reads_the_tracks_folder_beside_heatmaps(tracks_root):
    frame = pd.read_parquet(tracks_root)
    assert len(frame) == 2 * FRAMES * len(VIDEOS)
    assert sorted(frame["video"].unique()) == sorted(VIDEOS)
    assert sorted(frame["method"].unique()) == ["rolo", "yolo"]
    assert frame["box_xywh_px"].isna().sum() == 2 * len(VIDEOS)
    assert list(frame["box_xywh_px"].dropna().iloc[0]) == [10.0, 20.0, 30.0, 40.0]


@pytest.mark.parametrize("table", ["features", "tracks"])
def test_pyarrow_dataset_with_hive_partitioning_keeps_the_contract_types(table, features_root, tracks_root):
    root = features_root if table == "features" else tracks_root
    read = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    expected = pa.parquet.read_schema(tables.done_units(root)[VIDEOS[0]])
    assert read.schema.remove_metadata() == expected.remove_metadata()
    assert read.schema.field("video").type == pa.string()
    assert sorted(set(read.column("video").to_pylist())) == sorted(VIDEOS)


def test_duckdb_reads_both_tables_with_a_glob(features_root, tracks_root):
    counts = duckdb.sql(f"SELECT video, count(*) AS n FROM read_parquet('{tracks_root}/**/*.parquet') "
                        f"GROUP BY video ORDER BY video").fetchall()
    assert counts == [(v, 2 * FRAMES) for v in sorted(VIDEOS)]
    video_type = duckdb.sql(f"SELECT typeof(video), max(frame) FROM read_parquet('{features_root}/**/*.parquet') "
                            f"GROUP BY 1").fetchall()
    assert video_type == [("VARCHAR", FRAMES)]


def test_a_table_in_the_old_hive_layout_is_refused_with_the_fix(tmp_path, features_root):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(features_root, old)
    (old / VIDEOS[1]).rename(old / f"video={VIDEOS[1]}")
    with pytest.raises(InputError, match=r"old video=<name>/ layout.*mv"):
        tables.done_units(str(old))
    with pytest.raises(InputError, match="old video=<name>/ layout"):
        tables.FeaturesTable.open(str(old))
