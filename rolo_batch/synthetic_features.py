"""Features tables with a learnable signal, faster to make than to extract (a benchmark uses them too)."""

from __future__ import annotations

import numpy as np

from rolo_batch import boxes, contracts, storage, tables

IMAGE_WH = (320, 240)


def synthetic_feature_frames(video: str, frames: int, dim: int, seed: int, noise: float = 0.02,
                             map_shape: tuple[int, int, int] | None = None) -> tables.FeatureFrames:
    """A video whose target box wanders smoothly; the detection is the box plus noise, the ground truth the box
    itself. The feature is a fixed non-linear code of the box (so a model can read the box off it), or with
    ``map_shape`` ``(C, H, W)`` an activation map whose channel 0 marks the cells inside the box (the others
    are noise; ``dim`` is then ignored), and the detection errs by ``10 * noise`` of the box size per frame, an
    error that only looking inside the detection can correct."""
    rng = np.random.default_rng(seed)
    centre = np.clip(0.5 + np.cumsum(rng.normal(0, 0.02, (frames, 2)), axis=0), 0.2, 0.8)
    size = np.clip(0.2 + np.cumsum(rng.normal(0, 0.005, (frames, 2)), axis=0), 0.1, 0.3)
    box_norm = np.concatenate([centre, size], axis=1)
    if map_shape is None:
        code = np.random.default_rng(12345).normal(size=(4, dim))  # the same code for every video
        feature = np.tanh(box_norm @ code * 2 + rng.normal(0, noise, (frames, dim)))
        detected = box_norm + rng.normal(0, noise, box_norm.shape)
    else:
        feature = box_maps(box_norm, map_shape, rng)
        error = rng.normal(0, 10 * noise, (frames, 4))
        detected = np.concatenate([centre + error[:, :2] * size, size * np.exp(error[:, 2:])], axis=1)
    detected = np.clip(detected, 0.01, 0.99)
    detection = np.concatenate([np.zeros((frames, 1)), detected, np.full((frames, 1), 0.8)], axis=1)
    gt = boxes.cxcywh_norm_to_xywh_px(box_norm, IMAGE_WH)
    return tables.FeatureFrames(
        video=video, frame=np.arange(1, frames + 1), image_wh=np.tile(IMAGE_WH, (frames, 1)),
        feature=feature.astype(np.float32), detection=detection.astype(np.float32),
        detections=[d[None, :].astype(np.float32) for d in detection], gt_boxes_xywh_px=gt.astype(np.float32),
        gt_valid=np.ones(frames, bool))


def box_maps(box_norm: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """``(N, C * H * W)`` flattened maps of ``(N, 4)`` ``cxcywh_norm`` boxes: channel 0 is 1 in the cells whose
    centre lies inside the box, every other channel Gaussian noise."""
    channels, height, width = shape
    cx, cy, w, h = (box_norm[:, i, None] for i in range(4))
    inside_x = np.abs((np.arange(width) + 0.5) / width - cx) <= w / 2
    inside_y = np.abs((np.arange(height) + 0.5) / height - cy) <= h / 2
    maps = rng.normal(0, 0.3, (len(box_norm), channels, height, width))
    maps[:, 0] = inside_y[:, :, None] & inside_x[:, None, :]
    return maps.reshape(len(box_norm), -1)


def write_synthetic_features(table_root: str, videos: int = 4, frames: int = 60, dim: int = 16, seed: int = 0,
                             detector_id: str = "synthetic-0000",
                             map_shape: tuple[int, int, int] | None = None) -> list[str]:
    """A features table of ``videos`` synthetic videos under ``table_root`` (see ``synthetic_feature_frames``);
    returns their names."""
    names = []
    for i in range(videos):
        rows = synthetic_feature_frames(f"video-{i}", frames, dim, seed=seed * 1000 + i, map_shape=map_shape)
        unit = tables.unit_uri(table_root, rows.video)
        tables.write_parquet(storage.join(unit, tables.PART_FILE), rows.to_arrow(), contracts.load("features"),
                             tables.features_metadata(detector_id, rows.feature_dim, map_shape))
        storage.mark_done(unit, tables.features_marker(rows.video, rows.frame, detector_id, rows.feature_dim,
                                                       IMAGE_WH, feature_shape=map_shape))
        names.append(rows.video)
    return names
