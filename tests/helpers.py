"""Test data: see rolo_batch.synthetic_features."""

from rolo_batch.synthetic_features import IMAGE_WH, synthetic_feature_frames, write_synthetic_features

__all__ = ["IMAGE_WH", "synthetic_feature_frames", "write_synthetic_features"]
