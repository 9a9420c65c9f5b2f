"""Table contracts: loaded from schemas/, complete, and enforced with errors that name the column."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from rolo_batch import contracts
from rolo_batch.errors import InputError
from tests.conftest import REPO_ROOT


def test_every_table_has_a_contract_with_described_columns():
    assert {"features", "tracks", "scores"} <= set(contracts.available())
    for name in contracts.available():
        contract = contracts.load(name)
        assert contract.table == name and contract.version >= 1 and contract.description
        assert contract.columns, name
        for column in contract.columns:
            assert column.description.strip(), f"{name}.{column.name} has no description"


def test_packaged_contracts_are_the_files_in_schemas():
    for name in contracts.available():
        on_disk = json.loads((REPO_ROOT / "schemas" / f"{name}.json").read_text())
        assert contracts.load(name).column_names == [c["name"] for c in on_disk["columns"]]


def test_arrow_schema_fills_parameters_and_tags_the_version():
    schema = contracts.load("features").arrow_schema({"rolo_batch.detector_id": "tiny-abc"}, feature_dim=16)
    assert schema.field("feature").type == pa.list_(pa.float16(), 16)
    assert schema.metadata[b"rolo_batch.schema"] == b"features/1"
    assert schema.metadata[b"rolo_batch.detector_id"] == b"tiny-abc"


def _tracks_table(**overrides):
    columns = {
        "video": pa.array(["a", "a"]),
        "frame": pa.array([1, 2], pa.int32()),
        "method": pa.array(["rolo", "rolo"]),
        "box_xywh_px": pa.array([[1, 2, 3, 4], None], pa.list_(pa.float32(), 4)),
        "confidence": pa.array([0.5, None], pa.float32()),
        "time_ms": pa.array([1.0, 2.0], pa.float32()),
    }
    columns.update(overrides)
    return pa.table({k: v for k, v in columns.items() if v is not None})


def test_a_conforming_table_validates():
    contracts.load("tracks").validate(_tracks_table())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": None}, r"column 'method' is missing"),
        ({"frame": pa.array([1, 2], pa.int64())}, r"column 'frame' has type int64, expected int32"),
        ({"box_xywh_px": pa.array([[1, 2, 3]] * 2, pa.list_(pa.float32(), 3))}, r"column 'box_xywh_px'"),
        ({"extra": pa.array([1, 2])}, r"unexpected column\(s\) 'extra'"),
        ({"video": pa.array(["a", None])}, r"column 'video' has 1 null value"),
    ],
    ids=["missing", "wrong-type", "wrong-size", "extra", "null-in-required"],
)
def test_violations_name_the_column(overrides, message):
    with pytest.raises(InputError, match=message) as info:
        contracts.load("tracks").validate(_tracks_table(**overrides), source="s3://b/t.parquet")
    assert "s3://b/t.parquet" in str(info.value)


def test_feature_size_is_checked_against_what_the_model_expects():
    contract = contracts.load("features")
    schema = contract.arrow_schema(feature_dim=8)
    assert contract.validate(schema) == {"feature_dim": 8}
    with pytest.raises(InputError, match="feature_dim is 8, expected 4096"):
        contract.validate(schema, feature_dim=4096)


def test_a_file_written_under_another_contract_version_is_refused():
    schema = contracts.load("tracks").arrow_schema().with_metadata({b"rolo_batch.schema": b"tracks/99"})
    with pytest.raises(InputError, match="tracks/99.*reads tracks/1"):
        contracts.load("tracks").validate(schema)


def test_conform_casts_and_orders_columns():
    loose = pa.table({
        "time_ms": pa.array([1.0], pa.float64()),
        "confidence": pa.array([None], pa.float64()),
        "box_xywh_px": pa.array([[1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float64(), 4)),
        "method": ["yolo"], "frame": pa.array([7], pa.int64()), "video": ["v"],
    })
    table = contracts.load("tracks").conform(loose)
    assert table.schema.names == contracts.load("tracks").column_names
    assert table.schema.field("frame").type == pa.int32()
    assert table.column("box_xywh_px").to_pylist() == [[1.0, 2.0, 3.0, 4.0]]
    assert np.isclose(table.column("time_ms")[0].as_py(), 1.0)
