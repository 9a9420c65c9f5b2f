"""The tables in code: one hub type per table, and contract-checked Parquet I/O.

Stages pass ``FeatureFrames`` and ``TrackRows`` (dataclasses of numpy arrays, units and formats in the
field names) and convert to Arrow only at the edges, through the contracts in ``schemas/``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rolo_batch import contracts, storage
from rolo_batch.errors import InputError, StorageError

PART_FILE = "part-0.parquet"
FEATURES_DIR = "features"
DETECTOR_MANIFEST = "_detector.json"
DETECTION_FIELDS = ("class_id", "cx", "cy", "w", "h", "confidence")


# --- Parquet I/O -----------------------------------------------------------------------------------------

class ParquetUnitWriter:
    """Streams row batches into one Parquet file that appears at ``uri`` only when the writer closes cleanly.

    Every batch is conformed to the contract before it is written; memory holds one batch, not the file.
    """

    def __init__(self, uri: str, contract: contracts.Contract, metadata: Mapping[str, str] | None = None,
                 **params: int) -> None:
        self.uri = uri
        self.contract = contract
        self.schema = contract.arrow_schema(metadata, **params)
        self.params = params
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "ParquetUnitWriter":
        stream = self._stack.enter_context(storage.atomic_output(self.uri))
        self._writer = pq.ParquetWriter(stream, self.schema, compression="zstd")
        return self

    def write(self, table: pa.Table) -> None:
        assert self._writer is not None, "use ParquetUnitWriter as a context manager"
        conformed = self.contract.conform(table, **self.params).replace_schema_metadata(self.schema.metadata)
        self._writer.write_table(conformed)
        self.rows += conformed.num_rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._writer is not None
        try:
            self._writer.close()
        finally:
            self._stack.__exit__(exc_type, exc, tb)
        return False


def write_parquet(uri: str, table: pa.Table, contract: contracts.Contract,
                  metadata: Mapping[str, str] | None = None, **params: int) -> None:
    """Write ``table`` to ``uri`` atomically, conformed to ``contract`` (sizes inferred from ``table``)."""
    params = {**contract.infer_parameters(table.schema), **params}
    with ParquetUnitWriter(uri, contract, metadata, **params) as writer:
        writer.write(table)


def read_parquet(uri: str, contract: contracts.Contract, columns: list[str] | None = None,
                 **params: int) -> pa.Table:
    """Read one Parquet file, checking its schema against ``contract`` first."""
    try:
        with storage.open_input_file(uri) as handle:
            parquet = pq.ParquetFile(handle)
            contract.validate(parquet.schema_arrow, source=uri, **params)
            return parquet.read(columns=columns)
    except pa.ArrowInvalid as exc:
        raise InputError(f"not a readable Parquet file: {exc}", path=uri) from None


def read_schema(uri: str) -> pa.Schema:
    """The Arrow schema (with metadata) of one Parquet file."""
    try:
        with storage.open_input_file(uri) as handle:
            return pq.ParquetFile(handle).schema_arrow
    except pa.ArrowInvalid as exc:
        raise InputError(f"not a readable Parquet file: {exc}", path=uri) from None


OLD_UNIT_PREFIX = "video="  # the layout before 0.2: hive-style folders that clashed with the video column


def unit_uri(table_root: str, video: str) -> str:
    """The directory of one video's unit in a per-video table: ``<root>/<name>``.

    The folder is the video's name only (no hive ``video=`` key): the ``video`` column inside the file is the
    one source of that value, so pandas, pyarrow, DuckDB and Spark all read it as the same string column.
    """
    return storage.join(table_root, video)


def done_units(table_root: str) -> dict[str, str]:
    """Finished per-video units under ``table_root``: video name -> URI of its Parquet file.

    Units without a done marker (a run that died, a write in progress) are not listed, nor are names that
    start with ``_`` or ``.`` (reserved for the table's own files). A unit whose name is not a safe video
    name (it could lead outside the output root) is an ``InputError``, and so is a table in the old
    ``video=<name>/`` layout (the message says how to move it).
    """
    from rolo_batch.datasets.base import check_video_name

    found = {}
    for entry in storage.list_dir(table_root, missing_ok=True):
        if not entry.is_dir or entry.name.startswith(("_", ".")):
            continue
        if entry.name.startswith(OLD_UNIT_PREFIX):
            raise _old_layout_error(table_root)
        if storage.is_done(entry.uri):
            found[check_video_name(entry.name, where=entry.uri)] = storage.join(entry.uri, PART_FILE)
    return found


def _old_layout_error(table_root: str) -> InputError:
    return InputError("this table has units in the old video=<name>/ layout, which rolo-batch no longer "
                      "reads; rename each folder to <name>/ (for a local folder: "
                      "cd TABLE && for d in video=*; do mv \"$d\" \"${d#video=}\"; done) or run the stage "
                      "again into a new output folder", path=table_root)


def table_files(uri: str) -> list[str]:
    """The Parquet files of a table: ``uri`` itself if it is a file, else the done units under it."""
    if storage.is_file(uri):
        return [uri]
    units = done_units(uri)
    if not units:
        raise StorageError(uri, "no finished per-video units (<video>/part-0.parquet with a _done.json) here")
    return [units[name] for name in sorted(units)]


def features_root(out_uri: str, detector_id: str) -> str:
    """``<out>/features/<detector-id>``: features from different weights never mix."""
    return storage.join(out_uri, FEATURES_DIR, detector_id)


def features_metadata(detector_id: str, feature_dim: int,
                      feature_shape: tuple[int, int, int] | None = None) -> dict[str, str]:
    """The file metadata of a features unit (see the contract): the detector id, D, and for a feature map its
    ``C,H,W``."""
    metadata = {"rolo_batch.detector_id": detector_id, "rolo_batch.feature_dim": str(int(feature_dim))}
    if feature_shape is not None:
        metadata["rolo_batch.feature_shape"] = ",".join(str(int(v)) for v in feature_shape)
    return metadata


def features_marker(video: str, frame_numbers: np.ndarray, detector_id: str, feature_dim: int,
                    image_wh: tuple[int, int], feature_shape: tuple[int, int, int] | None = None,
                    **extra: Any) -> dict:
    """The done marker of one video's features unit: what readers learn without opening the Parquet file.
    ``feature_shape``: ``(C, H, W)`` when the feature is a flattened activation map, else None."""
    return {"video": video, "rows": int(len(frame_numbers)), "first_frame": int(frame_numbers[0]),
            "last_frame": int(frame_numbers[-1]), "detector_id": detector_id, "feature_dim": int(feature_dim),
            "feature_shape": None if feature_shape is None else [int(v) for v in feature_shape],
            "image_width": int(image_wh[0]), "image_height": int(image_wh[1]), **extra}


@dataclass(frozen=True)
class FeaturesUnit:
    """One finished video of the features table: its Parquet file and its done marker's content
    (rows, first/last frame, image size, the source video, the detector id)."""

    video: str
    part_uri: str
    info: dict

    @property
    def frame_numbers(self) -> np.ndarray:
        return np.arange(int(self.info["first_frame"]), int(self.info["last_frame"]) + 1, dtype=np.int32)


@dataclass(frozen=True)
class FeaturesTable:
    """A features table on storage: ``features/<detector-id>/<video>/`` units that are done.
    ``feature_shape``: ``(C, H, W)`` when each feature is a flattened activation map, else None."""

    root: str
    detector_id: str
    feature_dim: int
    units: dict[str, FeaturesUnit]
    feature_shape: tuple[int, int, int] | None = None

    @classmethod
    def open(cls, uri: str, videos: list[str] | None = None) -> "FeaturesTable":
        """Open the table at ``uri``: a table root, or an output root holding exactly one ``features/<id>``.

        ``videos`` keeps only those (an unknown or unfinished one is an error naming it).
        """
        root = _table_root(uri)
        done = done_units(root)
        if not done:
            raise StorageError(root, "no finished videos in this features table (run rolo-batch extract first)")
        names = sorted(done) if videos is None else videos
        missing = [v for v in names if v not in done]
        if missing:
            raise InputError(f"video(s) {', '.join(missing)} have no finished features here "
                             f"(finished: {', '.join(sorted(done))})", path=root)
        units = {}
        for name in names:
            info = storage.read_done(unit_uri(root, name)) or {}
            units[name] = FeaturesUnit(name, done[name], info)
        first = units[names[0]].info
        shape = first.get("feature_shape")
        return cls(root, str(first.get("detector_id", storage.basename(root))), int(first["feature_dim"]), units,
                   tuple(int(v) for v in shape) if shape else None)


def _table_root(uri: str) -> str:
    """``uri`` itself when it holds finished units, else the one ``features/<id>`` table under it."""
    for entry in storage.list_dir(uri, missing_ok=True):
        if entry.is_dir and entry.name.startswith(OLD_UNIT_PREFIX):
            raise _old_layout_error(uri)
        if entry.is_dir and entry.name != FEATURES_DIR and storage.is_done(entry.uri):
            return uri
    candidates = [e.uri for e in storage.list_dir(storage.join(uri, FEATURES_DIR), missing_ok=True) if e.is_dir]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise StorageError(uri, "not a features table (no finished <video>/ units, no features/<detector-id>/)")
    raise InputError(f"several features tables here ({', '.join(storage.basename(c) for c in candidates)}); "
                     f"pass one of them", path=uri)


# --- hub types -------------------------------------------------------------------------------------------

@dataclass
class FeatureFrames:
    """Rows of the features table for consecutive frames of one video.

    Shapes (N frames, D feature size, K detections in a frame):
    ``frame`` (N,) int32 1-based; ``image_wh`` (N, 2) int32 pixels; ``feature`` (N, D) float;
    ``detection`` (N, 6) float32 ``(class_id, cx, cy, w, h, confidence)`` normalised;
    ``detections`` list of N arrays (K, 6) in the same layout, most confident first;
    ``gt_boxes_xywh_px`` (N, 4) float32, NaN rows where the video has no box; ``gt_valid`` (N,) bool.
    """

    video: str
    frame: np.ndarray
    image_wh: np.ndarray
    feature: np.ndarray
    detection: np.ndarray
    detections: list[np.ndarray]
    gt_boxes_xywh_px: np.ndarray
    gt_valid: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.frame)
        checks = {"image_wh": (n, 2), "detection": (n, 6), "gt_boxes_xywh_px": (n, 4), "gt_valid": (n,)}
        for name, shape in checks.items():
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"FeatureFrames.{name} has shape {np.shape(getattr(self, name))}, expected {shape}")
        if np.ndim(self.feature) != 2 or len(self.feature) != n:
            raise ValueError(f"FeatureFrames.feature has shape {np.shape(self.feature)}, expected ({n}, D)")
        if len(self.detections) != n:
            raise ValueError(f"FeatureFrames.detections has {len(self.detections)} entries, expected {n}")

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def feature_dim(self) -> int:
        return int(self.feature.shape[1])

    def to_arrow(self) -> pa.Table:
        """Arrow rows in the features contract (float16 features)."""
        n = len(self)
        dets = [np.asarray(d, dtype=np.float32).reshape(-1, 6) for d in self.detections]
        flat = np.concatenate(dets) if n and sum(len(d) for d in dets) else np.zeros((0, 6), np.float32)
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in dets])]).astype(np.int32)
        det_struct = pa.StructArray.from_arrays(
            [pa.array(flat[:, 0].astype(np.int32)), pa.array(flat[:, 5]), pa.array(flat[:, 1]),
             pa.array(flat[:, 2]), pa.array(flat[:, 3]), pa.array(flat[:, 4])],
            names=["class_id", "confidence", "cx", "cy", "w", "h"])
        gt = np.asarray(self.gt_boxes_xywh_px, dtype=np.float32)
        gt_missing = ~np.isfinite(gt).any(axis=1) if n else np.zeros(0, bool)
        return pa.table({
            "video": pa.array([self.video] * n, pa.string()),
            "frame": pa.array(np.asarray(self.frame, np.int32)),
            "image_width": pa.array(np.asarray(self.image_wh, np.int32)[:, 0] if n else [], pa.int32()),
            "image_height": pa.array(np.asarray(self.image_wh, np.int32)[:, 1] if n else [], pa.int32()),
            "feature": _fixed_list(np.asarray(self.feature, np.float16), self.feature_dim),
            "detection": _fixed_list(np.asarray(self.detection, np.float32), 6),
            "detections": pa.ListArray.from_arrays(pa.array(offsets), det_struct),
            "gt_box_xywh_px": _fixed_list(np.nan_to_num(gt), 4, mask=gt_missing),
            "gt_valid": pa.array(np.asarray(self.gt_valid, bool)),
        })

    @classmethod
    def from_arrow(cls, table: pa.Table, feature_dtype: np.dtype = np.float32) -> "FeatureFrames":
        """Rows of one video from an Arrow table in the features contract (sorted by frame)."""
        videos = pc.unique(table.column("video")).to_pylist()
        if len(videos) != 1:
            raise ValueError(f"FeatureFrames holds one video, got {len(videos)}: {videos[:5]}")
        table = table.sort_by("frame")
        n = table.num_rows
        detections_col = table.column("detections").combine_chunks()
        offsets = detections_col.offsets.to_numpy()
        values = detections_col.flatten()
        flat = np.stack([values.field(name).to_numpy(zero_copy_only=False).astype(np.float32)
                         for name in DETECTION_FIELDS], axis=1) if len(values) else np.zeros((0, 6), np.float32)
        gt_col = table.column("gt_box_xywh_px").combine_chunks()
        gt = _fixed_list_to_numpy(gt_col, 4).astype(np.float32)
        gt[np.asarray(gt_col.is_null())] = np.nan
        return cls(
            video=videos[0],
            frame=table.column("frame").to_numpy().astype(np.int32),
            image_wh=np.stack([table.column("image_width").to_numpy(), table.column("image_height").to_numpy()],
                              axis=1).astype(np.int32) if n else np.zeros((0, 2), np.int32),
            feature=_fixed_list_to_numpy(table.column("feature").combine_chunks(), None).astype(feature_dtype),
            detection=_fixed_list_to_numpy(table.column("detection").combine_chunks(), 6).astype(np.float32),
            detections=[flat[offsets[i]:offsets[i + 1]] for i in range(n)],
            gt_boxes_xywh_px=gt,
            gt_valid=table.column("gt_valid").to_numpy(zero_copy_only=False).astype(bool),
        )


@dataclass
class TrackRows:
    """Rows of the tracks table for one video and one method.

    ``frame`` (N,) int32 1-based; ``boxes_xywh_px`` (N, 4) float, NaN rows where the method reports nothing;
    ``confidence`` (N,) float, NaN where unknown; ``time_ms`` (N,) float, NaN where not timed.
    """

    video: str
    method: str
    frame: np.ndarray
    boxes_xywh_px: np.ndarray
    confidence: np.ndarray = field(default=None)  # type: ignore[assignment]
    time_ms: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.frame)
        self.frame = np.asarray(self.frame, np.int32)
        self.boxes_xywh_px = np.asarray(self.boxes_xywh_px, np.float64).reshape(n, 4)
        self.confidence = np.full(n, np.nan) if self.confidence is None else np.asarray(self.confidence, float)
        self.time_ms = np.full(n, np.nan) if self.time_ms is None else np.asarray(self.time_ms, float)
        for name in ("confidence", "time_ms"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"TrackRows.{name} has shape {getattr(self, name).shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.frame)

    def to_arrow(self) -> pa.Table:
        n = len(self)
        missing = ~np.isfinite(self.boxes_xywh_px).all(axis=1) if n else np.zeros(0, bool)
        return pa.table({
            "video": pa.array([self.video] * n, pa.string()),
            "frame": pa.array(self.frame),
            "method": pa.array([self.method] * n, pa.string()),
            "box_xywh_px": _fixed_list(np.nan_to_num(self.boxes_xywh_px).astype(np.float32), 4, mask=missing),
            "confidence": pa.array(self.confidence.astype(np.float32), from_pandas=True),
            "time_ms": pa.array(self.time_ms.astype(np.float32), from_pandas=True),
        })

    @classmethod
    def from_arrow(cls, table: pa.Table) -> list["TrackRows"]:
        """One ``TrackRows`` per (video, method) in ``table``, each sorted by frame."""
        out = []
        keys = table.group_by(["video", "method"]).aggregate([]).sort_by([("video", "ascending"),
                                                                          ("method", "ascending")])
        for video, method in zip(keys.column("video").to_pylist(), keys.column("method").to_pylist()):
            mask = pc.and_(pc.equal(table.column("video"), video),
                                   pc.equal(table.column("method"), method))
            part = table.filter(mask).sort_by("frame")
            box_col = part.column("box_xywh_px").combine_chunks()
            boxes = _fixed_list_to_numpy(box_col, 4).astype(np.float64)
            boxes[np.asarray(box_col.is_null())] = np.nan
            out.append(cls(video=video, method=method, frame=part.column("frame").to_numpy(),
                           boxes_xywh_px=boxes,
                           confidence=part.column("confidence").to_numpy(zero_copy_only=False).astype(float),
                           time_ms=part.column("time_ms").to_numpy(zero_copy_only=False).astype(float)))
        return out


def _fixed_list(values: np.ndarray, size: int, mask: np.ndarray | None = None) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    if mask is None or not mask.any():
        return pa.FixedSizeListArray.from_arrays(flat, size)
    return pa.FixedSizeListArray.from_arrays(flat, size, mask=pa.array(mask))


def _fixed_list_to_numpy(column: pa.FixedSizeListArray, size: int | None) -> np.ndarray:
    size = size or column.type.list_size
    if len(column) == 0:
        return np.zeros((0, size))
    # ``.values`` ignores the parent's nulls and slicing offsets; flatten() respects slicing but drops null slots.
    values = column.values.slice(column.offset * size, len(column) * size)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), size)
