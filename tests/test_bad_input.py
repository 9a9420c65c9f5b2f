"""Bad input, as a table: each row makes one bad input and says what the user gets (an error naming the input,
or a documented behaviour). The per-video isolation of bad videos in whole jobs is in test_extract/test_track."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from rolo_batch import contracts, datasets, storage, tables
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector, save_detector
from rolo_batch.errors import InputError, StorageError
from rolo_batch.rolo import RoloConfig, build_model, export_model, load_model
from tests.helpers import synthetic_feature_frames


def one_video(root: Path) -> Path:
    synthesize(str(root), SynthConfig(videos=1, frames=5, width=96, height=72, seed=1))
    return root / "synth-000"


def open_first(root: Path) -> datasets.VideoSource:
    return datasets.open_video(datasets.discover(str(root)).videos[0])


def truncated_jpeg(root: Path):
    frame = one_video(root) / "img" / "0002.jpg"
    frame.write_bytes(frame.read_bytes()[:300])
    return lambda: open_first(root).read_frame(1)


def zero_byte_frame(root: Path):
    (one_video(root) / "img" / "0002.jpg").write_bytes(b"")
    return lambda: open_first(root).read_frame(1)


def missing_frame(root: Path):
    (one_video(root) / "img" / "0003.jpg").unlink()
    return lambda: len(open_first(root))


def groundtruth_with(text: str) -> Callable[[Path], Callable]:
    def make(root: Path):
        (one_video(root) / "groundtruth_rect.txt").write_text(text)
        return lambda: open_first(root).groundtruth
    return make


def undecodable_video_file(root: Path):
    root.mkdir()
    (root / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)
    return lambda: len(open_first(root))


def empty_collection(root: Path):
    root.mkdir()
    return lambda: datasets.discover(str(root)).require_videos()


def features_with_wrong_schema(root: Path):
    root.mkdir()
    path = root / "part-0.parquet"
    rows = tables.TrackRows("v", "rolo", np.arange(1, 3), np.zeros((2, 4)))
    tables.write_parquet(str(path), rows.to_arrow(), contracts.load("tracks"))
    return lambda: tables.read_parquet(str(path), contracts.load("features"))


def features_of_the_wrong_size_for_the_model(root: Path):
    root.mkdir()
    path = root / "part-0.parquet"
    tables.write_parquet(str(path), synthetic_feature_frames("v", 4, 16, seed=0).to_arrow(), contracts.load("features"))
    model = root / "model.pt"
    export_model(build_model(RoloConfig(feature_dim=32, steps=3, hidden_size=8, projection_size=8)), str(model),
                 split="exp2")
    _, info = load_model(str(model))
    return lambda: tables.read_parquet(str(path), contracts.load("features"), feature_dim=info.feature_dim)


def rolo_model_given_as_detector_weights(root: Path):
    root.mkdir()
    export_model(build_model(RoloConfig(feature_dim=16, steps=3)), str(root / "model.pt"), split="exp2")
    return lambda: build_detector(None, str(root / "model.pt"))


def detector_given_as_rolo_model(root: Path):
    root.mkdir()
    save_detector(build_detector("yolo-tiny", random_init=True), str(root / "detector.pt"))
    return lambda: load_model(str(root / "detector.pt"))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def pickled_code_as_a_model(root: Path):
    root.mkdir()
    buffer = io.BytesIO()
    torch.save({"format": "rolo-batch-model", "anything": Payload()}, buffer)
    (root / "evil.pt").write_bytes(buffer.getvalue())
    return lambda: load_model(str(root / "evil.pt"))


def plain_pickle_as_detector_weights(root: Path):
    root.mkdir()
    (root / "evil.pt").write_bytes(pickle.dumps(Payload()))
    return lambda: build_detector(None, str(root / "evil.pt"))


def unsupported_scheme(root: Path):
    return lambda: datasets.discover("gs://bucket/videos")


# input -> (error type, a fragment of the message, the name of the input the message must contain)
CASES = [
    (truncated_jpeg, InputError, "truncated", "0002.jpg"),
    (zero_byte_frame, InputError, "empty (0 bytes)", "0002.jpg"),
    (missing_frame, InputError, "0003.jpg is missing", "synth-000"),
    (groundtruth_with("1,2,3,4\n1,2,x,4\n"), InputError, "line 2", "groundtruth_rect.txt"),
    (groundtruth_with("1,2,3,4\n1,2,3,4,5\n"), InputError, "has 5 values, expected 4", "groundtruth_rect.txt"),
    (groundtruth_with("1,2,3,4\n" * 9), InputError, "9 boxes but the video has only 5 frames", "synth-000"),
    (undecodable_video_file, InputError, "cannot open the video file", "clip"),
    (empty_collection, InputError, "no videos found", "empty-collection"),
    (features_with_wrong_schema, InputError, "column 'image_width' is missing", "part-0.parquet"),
    (features_of_the_wrong_size_for_the_model, InputError, "feature_dim is 16, expected 32", "part-0.parquet"),
    (rolo_model_given_as_detector_weights, InputError, "not a rolo-batch detector checkpoint", "model.pt"),
    (detector_given_as_rolo_model, InputError, "not a rolo-batch model", "detector.pt"),
    (pickled_code_as_a_model, InputError, "refused", "evil.pt"),
    (plain_pickle_as_detector_weights, InputError, "refused to load", "evil.pt"),
    (unsupported_scheme, StorageError, "unsupported URI scheme 'gs'", "gs://bucket/videos"),
]


IDS = ["truncated-jpeg", "zero-byte-frame", "missing-frame", "groundtruth-malformed-line",
       "groundtruth-wrong-column-count", "groundtruth-more-boxes-than-frames", "undecodable-video-file",
       "empty-collection", "features-wrong-schema", "features-wrong-size-for-model", "rolo-model-as-detector",
       "detector-as-rolo-model", "pickled-code-as-model", "plain-pickle-as-detector", "unsupported-scheme"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make, error, message, names", CASES, ids=IDS)
def test_bad_input_gives_a_clear_error_naming_it(tmp_path, capsys, make, error, message, names):
    action = make(tmp_path / "empty-collection")
    with pytest.raises(error) as info:
        action()
    assert message in str(info.value)
    assert names in str(info.value)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("text, valid", [("1,2,-3,4\n", False), ("NaN,NaN,NaN,NaN\n", False), ("0,0,0,0\n", False),
                                         ("1,2,3,4\n", True)], ids=["negative-size", "nan", "zero-size", "good"])
def test_unusable_boxes_are_kept_and_marked_invalid(tmp_path, text, valid):
    (one_video(tmp_path) / "groundtruth_rect.txt").write_text(text)
    truth = open_first(tmp_path).groundtruth
    assert bool(truth.valid[0]) is valid and not truth.valid[1:].any()
    assert "1 boxes for 5 frames" in truth.notes[0]
