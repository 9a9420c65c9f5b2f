"""Features tables with a learnable signal, faster to make than to extract (a benchmark uses them too)."""

from __future__ import annotations

import numpy as np

from rolo_batch import boxes, contracts, storage, tables

IMAGE_WH = (320, 240)


def synthetic_feature_frames(video: str, frames: int, dim: int, seed: int, noise: float = 0.02) -> tables.FeatureFrames:
    """A video whose target box wanders smoothly; the feature is a fixed non-linear code of the box (so a model
    can read the box off it), the detection the box plus noise, the ground truth the box itself."""
    rng = np.random.default_rng(seed)
    code = np.random.default_rng(12345).normal(size=(4, dim))  # the same code for every video
    centre = np.clip(0.5 + np.cumsum(rng.normal(0, 0.02, (frames, 2)), axis=0), 0.2, 0.8)
    size = np.clip(0.2 + np.cumsum(rng.normal(0, 0.005, (frames, 2)), axis=0), 0.1, 0.3)
    box_norm = np.concatenate([centre, size], axis=1)
    feature = np.tanh(box_norm @ code * 2 + rng.normal(0, noise, (frames, dim)))
    detected = np.clip(box_norm + rng.normal(0, noise, box_norm.shape), 0.01, 0.99)
    detection = np.concatenate([np.zeros((frames, 1)), detected, np.full((frames, 1), 0.8)], axis=1)
    gt = boxes.cxcywh_norm_to_xywh_px(box_norm, IMAGE_WH)
    return tables.FeatureFrames(
        video=video, frame=np.arange(1, frames + 1), image_wh=np.tile(IMAGE_WH, (frames, 1)),
        feature=feature.astype(np.float32), detection=detection.astype(np.float32),
        detections=[d[None, :].astype(np.float32) for d in detection], gt_boxes_xywh_px=gt.astype(np.float32),
        gt_valid=np.ones(frames, bool))


def write_synthetic_features(table_root: str, videos: int = 4, frames: int = 60, dim: int = 16, seed: int = 0,
                             detector_id: str = "synthetic-0000") -> list[str]:
    """A features table of ``videos`` synthetic videos under ``table_root``; returns their names."""
    names = []
    for i in range(videos):
        rows = synthetic_feature_frames(f"video-{i}", frames, dim, seed=seed * 1000 + i)
        unit = tables.unit_uri(table_root, rows.video)
        tables.write_parquet(storage.join(unit, tables.PART_FILE), rows.to_arrow(), contracts.load("features"),
                             {"rolo_batch.detector_id": detector_id})
        storage.mark_done(unit, tables.features_marker(rows.video, rows.frame, detector_id, dim, IMAGE_WH))
        names.append(rows.video)
    return names
