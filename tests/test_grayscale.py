"""Grey frames (OTB's Car4 and Suv are single-channel JPEGs) through every stage: decoding, extraction, detector
training's decoding and augmentation, the OpenCV baselines and the overlay; and the frame contract itself
(``to_bgr``: grey, grey + alpha, BGRA, 16-bit in; ``(H, W, 3)`` uint8 BGR out, or an ``InputError``)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rolo_batch import contracts, datasets, render, storage, tables, trackers
from rolo_batch import detector_train as dt
from rolo_batch.datasets.images import decode_image, to_bgr
from rolo_batch.detector import YoloNet, build_detector, detector_config, init_weights
from rolo_batch.errors import InputError
from rolo_batch.extract import ExtractOptions, extract_video
from rolo_batch.track import track_baselines
from tests.conftest import REPO_ROOT

WIDTH, HEIGHT, FRAMES, SIDE = 96, 72, 10, 18
# the smallest detector the tests use (tests/test_detector_train.py): 64 px input, 2 x 2 grid
SMALL = detector_config("yolo-tiny", input_size=64, grid=2, feature_dim=16)
# Real development sequences beside the checkout (read in place); Car4 and Suv are single-channel JPEGs.
OTB_DEV = Path(os.environ.get("ROLO_OTB_DEV", REPO_ROOT.parent / "shared" / "data" / "otb-dev"))


def grey_frames() -> tuple[list[np.ndarray], np.ndarray]:
    """``FRAMES`` grey ``(HEIGHT, WIDTH)`` uint8 frames of a textured square moving over a textured background,
    and its ``(FRAMES, 4)`` xywh pixel boxes."""
    rng = np.random.default_rng(7)
    background = cv2.GaussianBlur(rng.integers(40, 120, (HEIGHT, WIDTH)).astype(np.uint8), (5, 5), 0)
    target = np.kron(rng.integers(150, 256, (3, 3)), np.ones((SIDE // 3, SIDE // 3))).astype(np.uint8)
    frames, boxes = [], []
    for i in range(FRAMES):
        x, y = 10 + 4 * i, 20 + 2 * i
        image = background.copy()
        image[y:y + SIDE, x:x + SIDE] = target
        frames.append(image)
        boxes.append([x, y, SIDE, SIDE])
    return frames, np.array(boxes, float)


def png_bytes(samples: np.ndarray, colour_type: int) -> bytes:
    """A PNG of ``samples`` (H, W) or (H, W, C), uint8 or uint16, written by hand: OpenCV cannot encode grey +
    alpha. ``colour_type``: 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA (PNG's codes)."""
    depth = 16 if samples.dtype == np.uint16 else 8
    rows = samples.astype(">u2" if depth == 16 else np.uint8).reshape(samples.shape[0], -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", samples.shape[1], samples.shape[0], depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def channels_in_file(data: bytes) -> int:
    """How many channels OpenCV finds in the file when it converts nothing (``IMREAD_UNCHANGED``)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return 1 if image.ndim == 2 else image.shape[2]


@pytest.fixture(scope="module")
def grey_otb(tmp_path_factory) -> Path:
    """A collection with one OTB-style video, ``Grey``, of genuinely single-channel JPEGs."""
    root = tmp_path_factory.mktemp("grey")
    frames, boxes = grey_frames()
    for n, image in enumerate(frames, start=1):
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        storage.write_bytes(str(root / "Grey" / "img" / f"{n:04d}.jpg"), jpeg.tobytes())
    storage.write_text(str(root / "Grey" / "groundtruth_rect.txt"),
                       "".join(",".join(str(int(v)) for v in b) + "\n" for b in boxes))
    return root


@pytest.fixture(scope="module")
def grey_video(grey_otb) -> datasets.VideoSource:
    return datasets.open_video(datasets.discover(str(grey_otb)).videos[0])


@pytest.fixture(scope="module")
def extracted(grey_otb, tmp_path_factory) -> tuple[tables.FeatureFrames, object]:
    """The grey video through extraction (the smallest detector, random weights): its features rows."""
    detector = build_detector(SMALL, random_init=True, seed=5)
    root = str(tmp_path_factory.mktemp("features"))
    ref = datasets.discover(str(grey_otb)).videos[0]
    result = extract_video(detector, ref, root, ExtractOptions(batch_size=4))
    assert result.status == "done" and result.frames == FRAMES
    table = tables.read_parquet(storage.join(tables.unit_uri(root, ref.name), tables.PART_FILE),
                                contracts.load("features"))
    return tables.FeatureFrames.from_arrow(table), detector


# --- the frame contract ----------------------------------------------------------------------------------

GREY = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (6, 1))  # (6, 32), every value known
GREY16 = GREY.astype(np.uint16) * 257 + 3  # high byte == GREY


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()


@pytest.mark.parametrize("data,channels,expected_bgr", [
    (_jpeg(GREY), 1, None),  # lossy: compared with OpenCV's own grey decode
    (png_bytes(GREY, 0), 1, np.dstack([GREY] * 3)),
    (png_bytes(GREY16, 0), 1, np.dstack([GREY] * 3)),
    (png_bytes(np.dstack([GREY, np.full_like(GREY, 9)]), 4), 4, np.dstack([GREY] * 3)),  # alpha is dropped
    (png_bytes(np.dstack([GREY16, np.full_like(GREY16, 9)]), 4), 4, np.dstack([GREY] * 3)),
    (png_bytes(np.dstack([GREY, 255 - GREY, GREY // 2, np.zeros_like(GREY)]), 6), 4,
     np.dstack([GREY // 2, 255 - GREY, GREY])),  # RGBA in the file, BGR out, transparent pixels kept
    (png_bytes(np.dstack([GREY16, GREY16, GREY16]), 2), 3, np.dstack([GREY] * 3)),
], ids=["grey jpeg", "grey png", "grey 16-bit png", "grey+alpha png", "grey+alpha 16-bit png", "rgba png",
        "rgb 16-bit png"])
def test_every_kind_of_image_file_decodes_to_bgr_uint8(data, channels, expected_bgr):
    assert channels_in_file(data) == channels  # OpenCV reports grey + alpha as 4 channels, unconverted
    image = decode_image(data, video="v", path="f.png")
    assert image.shape == GREY.shape + (3,) and image.dtype == np.uint8
    if expected_bgr is None:
        expected_bgr = np.dstack([cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)] * 3)
    np.testing.assert_array_equal(image, expected_bgr)


@pytest.mark.parametrize("image,expected", [
    (GREY, np.dstack([GREY] * 3)),
    (GREY[:, :, None], np.dstack([GREY] * 3)),
    (np.dstack([GREY, np.zeros_like(GREY)]), np.dstack([GREY] * 3)),
    (np.dstack([GREY, GREY // 2, 255 - GREY, np.zeros_like(GREY)]), np.dstack([GREY, GREY // 2, 255 - GREY])),
    (GREY16, np.dstack([GREY] * 3)),
    (np.dstack([GREY16] * 3), np.dstack([GREY] * 3)),
    (np.dstack([GREY] * 3)[:, ::2], np.dstack([GREY] * 3)[:, ::2]),  # a strided view is kept as it is
], ids=["grey", "grey HxWx1", "grey+alpha", "bgra", "grey 16-bit", "bgr 16-bit", "bgr view"])
def test_to_bgr_converts(image, expected):
    out = to_bgr(image, video="v", path="p")
    assert out.dtype == np.uint8 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_to_bgr_returns_a_bgr_frame_itself():
    frame = np.zeros((4, 5, 3), np.uint8)
    assert to_bgr(frame) is frame


@pytest.mark.parametrize("image,message", [
    (np.zeros((0, 5, 3), np.uint8), r"decoded to an empty image \(ndarray of shape \(0, 5, 3\)\)"),
    (None, r"decoded to an empty image \(NoneType of shape None\)"),
    (np.zeros((4, 5), np.float32), "a \\(4, 5\\) array of float32, which cannot be made"),
    (np.zeros((4, 5), np.int32), "array of int32"),
    (np.zeros((4, 5, 5), np.uint8), r"a \(4, 5, 5\) array of uint8, which cannot be made \(H, W, 3\) uint8 BGR"),
    (np.zeros((4, 5, 3, 1), np.uint8), r"a \(4, 5, 3, 1\) array"),
    (np.zeros(7, np.uint8), r"a \(7,\) array"),
], ids=["empty", "none", "float", "int32", "five channels", "4-d", "1-d"])
def test_to_bgr_refuses_naming_video_file_and_frame(image, message):
    with pytest.raises(InputError, match=message) as caught:
        to_bgr(image, video="Car4", path="s3://b/Car4/img/0007.jpg", frame=7)
    assert caught.value.video == "Car4" and caught.value.path == "s3://b/Car4/img/0007.jpg"
    assert str(caught.value).startswith("video 'Car4', s3://b/Car4/img/0007.jpg: frame 7: ")


# --- sources ---------------------------------------------------------------------------------------------

def test_a_grey_otb_folder_yields_bgr_frames_equal_to_the_grey_pixels(grey_otb, grey_video):
    files = sorted((grey_otb / "Grey" / "img").iterdir())
    assert len(files) == FRAMES and {channels_in_file(f.read_bytes()) for f in files} == {1}
    assert grey_video.image_size == (WIDTH, HEIGHT)
    for frame, path in zip(grey_video.iter_frames(), files):
        assert frame.image.shape == (HEIGHT, WIDTH, 3) and frame.image.dtype == np.uint8
        grey = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(frame.image, np.dstack([grey] * 3), err_msg=path.name)


@pytest.mark.parametrize("depth", [cv2.CV_8U, cv2.CV_16U], ids=["8-bit", "16-bit"])
def test_a_grey_video_file_yields_bgr_frames(tmp_path, depth):
    path = tmp_path / "grey.mkv"  # FFV1 keeps the stream grey (gray / gray16le)
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 30.0, (WIDTH, HEIGHT),
                             [cv2.VIDEOWRITER_PROP_IS_COLOR, 0, cv2.VIDEOWRITER_PROP_DEPTH, depth])
    assert writer.isOpened()
    frames, _ = grey_frames()
    for image in frames[:4]:
        writer.write(image if depth == cv2.CV_8U else image.astype(np.uint16) * 257)
    writer.release()
    raw = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    raw.set(cv2.CAP_PROP_CONVERT_RGB, 0)
    ok, unconverted = raw.read()
    raw.release()
    assert ok and unconverted.ndim == 2  # the file really holds one channel
    video = datasets.open_video(datasets.discover(str(path)).videos[0])
    image = video.read_frame(2)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image[:, :, 1], frames[2], atol=1)  # lossless, but 16-bit goes through BGR48
    assert (image[:, :, 0] == image[:, :, 2]).all()


# --- stages ----------------------------------------------------------------------------------------------

def test_extraction_of_a_grey_video(grey_video, extracted):
    frames, detector = extracted
    np.testing.assert_array_equal(frames.frame, np.arange(1, FRAMES + 1))
    assert frames.feature_dim == SMALL.feature_dim and np.isfinite(frames.feature).all()
    np.testing.assert_array_equal(frames.image_wh, [[WIDTH, HEIGHT]] * FRAMES)
    images = [f.image for f in grey_video.iter_frames()]
    batch = detector.preprocess(images)
    assert batch.shape == (FRAMES, 3, 64, 64)
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 1], batch[:, 2])  # grey stays grey
    np.testing.assert_allclose(frames.feature, detector(images).features, rtol=1e-2, atol=1e-2)


def test_detector_training_decodes_and_augments_grey_frames(grey_video):
    ref = grey_video.ref
    box = [[0.3, 0.4, 0.2, 0.25]] * 4
    item = {"name": [ref.name], "kind": [ref.kind], "uri": [ref.uri], "groundtruth_uri": [ref.groundtruth_uri],
            "indices": [[0, 3, 6, 9]], "frames": [[1, 4, 7, 10]], "boxes": [box], "class_id": [0]}
    [batch] = list(dt.decode_samples(item, SMALL.input_size))
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
    augmented = dt.augment_batch(batch, dt.AugmentConfig(), seed=0, epoch=1)
    assert augmented["image"].shape == (4, 3, 64, 64)
    image, moved, _ = dt.augment(grey_video.read_frame(0), np.array(box[0]), True, np.random.default_rng(3),
                                 dt.AugmentConfig(strength=2.0))
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8 and moved.shape == (4,)
    net = init_weights(YoloNet(SMALL), 0)
    loss, metrics = dt.objective(net, augmented)
    assert torch.isfinite(loss) and metrics["num_images"] == 4


def test_opencv_baselines_track_a_grey_video(grey_video, extracted):
    frames, _ = extracted
    rows = {r.method: r for r in track_baselines(frames, ("csrt", "kcf", "mil"), grey_video)}
    gt = grey_video.groundtruth.boxes_xywh_px
    for method, track in rows.items():
        assert len(track.frame) == FRAMES and np.isfinite(track.boxes_xywh_px).all(), method
    iou = box_iou(rows["csrt"].boxes_xywh_px, gt)
    assert iou.mean() > 0.6, f"CSRT lost the grey target: IoU per frame {np.round(iou, 2)}"


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes row by row (written out here, independent of rolo_batch.boxes)."""
    x1, y1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x2 = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    y2 = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)


def test_the_overlay_of_a_grey_video_draws_in_colour(grey_video, extracted, tmp_path):
    frames, _ = extracted
    rows = track_baselines(frames, ("csrt",), grey_video)
    out = tmp_path / f"grey{render.overlay_suffix()}"
    assert render.render_overlay(grey_video, rows, str(out), thickness=2, legend=False) == FRAMES
    assert render.check_video_file(str(out), render.overlay_format(), FRAMES, (WIDTH, HEIGHT)) == []
    capture = cv2.VideoCapture(str(out))
    ok, first = capture.read()
    capture.release()
    x, y, w, _ = grey_video.groundtruth.boxes_xywh_px[0].astype(int)
    b, g, r = first[y, x + w // 2].astype(int)  # the middle of the ground truth's top edge: red on grey
    assert ok and r - max(b, g) > 60, (b, g, r)


@pytest.mark.parametrize("name,size", [("Car4", (360, 240)), ("Suv", (320, 240))])
def test_the_real_grey_otb_sequences(name, size):
    if not (OTB_DEV / name).is_dir():
        pytest.skip(f"real OTB sequence {name} not found under {OTB_DEV}")
    video = datasets.open_video(datasets.discover(str(OTB_DEV), names=[name]).videos[0])
    files = sorted((OTB_DEV / name / "img").iterdir())[:12]
    assert {channels_in_file(f.read_bytes()) for f in files} == {1} and video.image_size == size
    frames = [f.image for f in video.iter_frames(0, len(files))]
    for image, path in zip(frames, files):
        np.testing.assert_array_equal(image, np.dstack([cv2.imread(str(path), cv2.IMREAD_UNCHANGED)] * 3))
    gt = video.groundtruth.boxes_xywh_px[:len(files)]
    observations = [trackers.Observation(i, i + 1, size, np.zeros((0, 6), np.float32), image=image)
                    for i, image in enumerate(frames)]
    [csrt] = trackers.run_trackers([trackers.make_baseline("csrt")], observations, gt[0], name)
    assert box_iou(csrt.boxes_xywh_px, gt).mean() > 0.5
