"""OTB folders and video files, local and on S3: discovery, frame numbering, alignment, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from rolo_batch import datasets, storage
from rolo_batch.datasets.images import encode_jpeg
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.errors import InputError


def write_otb(root: str, name: str, numbers, boxes=None, size=(32, 24), gt_name="groundtruth_rect.txt",
              digits=4) -> str:
    folder = storage.join(root, name)
    for n in numbers:
        image = np.full((size[1], size[0], 3), n % 255, np.uint8)
        storage.write_bytes(storage.join(folder, "img", f"{n:0{digits}d}.jpg"), encode_jpeg(image))
    if boxes is not None:
        storage.write_text(storage.join(folder, gt_name), "\n".join(",".join(map(str, b)) for b in boxes) + "\n")
    return folder


def test_real_otb_samples(otb_samples):
    found = datasets.discover(str(otb_samples))
    assert [v.name for v in found.videos] == ["Crossing", "David", "Human7"] and not found.rejected
    expected = {"Crossing": (120, (360, 240)), "David": (471, (320, 240)), "Human7": (250, (320, 240))}
    for ref in found.videos:
        video = datasets.open_video(ref)
        frames, size = expected[ref.name]
        assert len(video) == frames and video.image_size == size
        assert video.groundtruth.valid.all() and len(video.groundtruth.boxes_xywh_px) == frames
        assert video.frame_numbers[0] == 1 and video.frame_numbers[-1] == frames
        assert video.read_frame(frames - 1).shape == (size[1], size[0], 3)
    human7 = datasets.open_video(found.videos[2])
    np.testing.assert_array_equal(human7.first_box_xywh_px, [110, 111, 37, 116])


def test_sequence_starting_after_frame_one_keeps_its_numbers(tmp_path):
    write_otb(str(tmp_path), "Late", range(300, 306), [[1, 2, 3, 4]] * 6)
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    np.testing.assert_array_equal(video.frame_numbers, range(300, 306))
    assert [f.number for f in video.iter_frames(2, 4)] == [302, 303]
    assert video.groundtruth.valid.all()


def test_more_frames_than_boxes_aligns_from_the_first_frame_and_says_so(tmp_path):
    write_otb(str(tmp_path), "Short", range(1, 9), [[1, 2, 3, 4]] * 5)
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    np.testing.assert_array_equal(video.groundtruth.valid, [True] * 5 + [False] * 3)
    assert np.isnan(video.groundtruth.boxes_xywh_px[5:]).all()
    assert "5 boxes for 8 frames" in video.groundtruth.notes[0]


def test_known_otb_subrange_is_used_when_it_fits(tmp_path):
    # Tiger1 is evaluated on frames 6-354 of its 354 images: 349 boxes.
    write_otb(str(tmp_path), "Tiger1", range(1, 355), [[1, 2, 3, 4]] * 349, size=(8, 8))
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    assert not video.groundtruth.valid[:5].any() and video.groundtruth.valid[5:].all()
    assert video.first_box_xywh_px is None


def test_zero_size_and_nan_boxes_are_kept_and_invalid(tmp_path):
    write_otb(str(tmp_path), "Gone", range(1, 4), [[1, 2, 3, 4], [0, 0, 0, 0], ["NaN"] * 4])
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    np.testing.assert_array_equal(video.groundtruth.valid, [True, False, False])


def test_more_boxes_than_frames_is_an_error_naming_the_video(tmp_path):
    write_otb(str(tmp_path), "Cut", range(1, 4), [[1, 2, 3, 4]] * 5)
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    with pytest.raises(InputError, match="'Cut'.*5 boxes but the video has only 3 frames"):
        video.groundtruth


def test_missing_frame_is_an_error_naming_the_file(tmp_path):
    write_otb(str(tmp_path), "Holes", [1, 2, 4, 5], [[1, 2, 3, 4]] * 4)
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    with pytest.raises(InputError, match=r"'Holes'.*0003\.jpg is missing"):
        len(video)


def test_malformed_groundtruth_names_video_file_and_line(tmp_path):
    folder = write_otb(str(tmp_path), "Woman", range(1, 4))
    storage.write_text(storage.join(folder, "groundtruth_rect.txt"), "1,2,3,4\n1,2,3,4\n1,2,3\n")
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    with pytest.raises(InputError) as info:
        video.groundtruth
    assert info.value.video == "Woman" and info.value.line == 3
    assert "Woman/groundtruth_rect.txt line 3" in str(info.value)


@pytest.mark.parametrize("content, message", [(b"", "empty"), (None, "truncated"), (b"\x00garbage" * 10,
                                                                                   "cannot be decoded")],
                         ids=["zero-byte", "truncated-jpeg", "garbage"])
def test_undecodable_frames_name_video_and_file(tmp_path, content, message):
    folder = write_otb(str(tmp_path), "Broken", range(1, 4), [[1, 2, 3, 4]] * 3)
    frame2 = storage.join(folder, "img", "0002.jpg")
    data = storage.read_bytes(frame2)
    storage.write_bytes(frame2, data[: len(data) // 2] if content is None else content)
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    video.read_frame(0)
    with pytest.raises(InputError, match=message) as info:
        video.read_frame(1)
    assert info.value.video == "Broken" and info.value.path.endswith("img/0002.jpg")


def test_frame_of_another_size_is_an_error(tmp_path):
    folder = write_otb(str(tmp_path), "Resized", range(1, 3), [[1, 2, 3, 4]] * 2)
    storage.write_bytes(storage.join(folder, "img", "0002.jpg"), encode_jpeg(np.zeros((10, 10, 3), np.uint8)))
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    with pytest.raises(InputError, match="10x10"):
        video.read_frame(1)


def test_several_targets_become_several_videos(tmp_path):
    folder = write_otb(str(tmp_path), "Jogging", range(1, 3))
    storage.write_text(storage.join(folder, "groundtruth_rect.1.txt"), "1,1,5,5\n2,2,5,5\n")
    storage.write_text(storage.join(folder, "groundtruth_rect.2.txt"), "9,9,5,5\n8,8,5,5\n")
    found = datasets.discover(str(tmp_path))
    assert [v.name for v in found.videos] == ["Jogging-1", "Jogging-2"]
    second = datasets.open_video(found.videos[1])
    np.testing.assert_array_equal(second.first_box_xywh_px, [9, 9, 5, 5])


def test_frames_with_other_digit_counts_and_no_groundtruth(tmp_path):
    write_otb(str(tmp_path), "Long", range(1, 4), None, digits=8)
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    assert len(video) == 3 and not video.groundtruth.valid.any() and video.first_box_xywh_px is None


@pytest.mark.parametrize("bad_name", ["..", "-dash-first", "with space", "a" * 200])
def test_unsafe_video_names_are_rejected_not_used(tmp_path, bad_name):
    write_otb(str(tmp_path), "good", range(1, 3), [[1, 2, 3, 4]] * 2)
    (tmp_path / bad_name).mkdir(exist_ok=True)
    write_otb(str(tmp_path / bad_name), "", range(1, 3)) if bad_name != ".." else None
    found = datasets.discover(str(tmp_path))
    assert [v.name for v in found.videos] == ["good"]
    if bad_name != "..":
        assert len(found.rejected) == 1 and "is not allowed" in str(found.rejected[0])


def test_check_video_name():
    assert datasets.check_video_name("Jogging-1") == "Jogging-1"
    for bad in ("../etc", "/abs", "a/b", ".hidden", "a..b", "", "é"):
        with pytest.raises(InputError, match="not allowed"):
            datasets.check_video_name(bad)


def test_empty_collection_says_what_a_collection_looks_like(tmp_path):
    (tmp_path / "empty").mkdir()
    found = datasets.discover(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no videos found.*img/0001.jpg"):
        found.require_videos()


def test_selecting_videos_by_name(tmp_path):
    for name in ("a", "b", "c"):
        write_otb(str(tmp_path), name, range(1, 3), [[1, 2, 3, 4]] * 2)
    assert [v.name for v in datasets.discover(str(tmp_path), names=["c", "a"]).videos] == ["c", "a"]
    with pytest.raises(InputError, match="zz"):
        datasets.discover(str(tmp_path), names=["zz"])


def test_collection_on_s3_reads_like_the_local_one(tmp_path, bucket):
    config = SynthConfig(videos=2, frames=6, width=96, height=72, seed=5)
    synthesize(str(tmp_path), config)
    synthesize(f"s3://{bucket}/collection", config)
    local = datasets.discover(str(tmp_path))
    remote = datasets.discover(f"s3://{bucket}/collection")
    assert [v.name for v in remote.videos] == [v.name for v in local.videos] == ["synth-000", "synth-001"]
    for lref, rref in zip(local.videos, remote.videos):
        lv, rv = datasets.open_video(lref), datasets.open_video(rref)
        np.testing.assert_array_equal(lv.groundtruth.boxes_xywh_px, rv.groundtruth.boxes_xywh_px)
        np.testing.assert_array_equal(lv.read_frame(3), rv.read_frame(3))
    assert datasets.discover(f"s3://{bucket}/collection/synth-001").videos[0].name == "synth-001"


# --- video files ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mp4_collection(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("mp4"))
    synthesize(root, SynthConfig(videos=1, frames=40, width=128, height=96, seed=2, video_files=True))
    return root


def test_video_file_with_sidecar(mp4_collection):
    found = datasets.discover(mp4_collection)
    assert [(v.name, v.kind) for v in found.videos] == [("synth-000", "file")]
    video = datasets.open_video(found.videos[0])
    assert len(video) == 40 and video.image_size == (128, 96)
    np.testing.assert_array_equal(video.frame_numbers, np.arange(1, 41))
    assert video.groundtruth.valid.all()


def test_video_file_random_access_is_frame_accurate(mp4_collection):
    ref = datasets.discover(mp4_collection).videos[0]
    sequential = [f.image for f in datasets.open_video(ref).iter_frames()]
    assert len(sequential) == 40
    assert not np.array_equal(sequential[10], sequential[11])
    random_access = datasets.open_video(ref)
    for index in (37, 3, 22, 23, 0, 39, 12):
        np.testing.assert_array_equal(random_access.read_frame(index), sequential[index], err_msg=f"frame {index}")


def test_sidecar_with_only_the_first_box(tmp_path, mp4_collection):
    import shutil

    shutil.copy(f"{mp4_collection}/synth-000.mp4", tmp_path / "clip.mp4")
    (tmp_path / "clip.groundtruth.txt").write_text("10,20,30,40\n")
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    np.testing.assert_array_equal(video.first_box_xywh_px, [10, 20, 30, 40])
    assert video.groundtruth.valid.sum() == 1


def test_a_file_that_is_not_a_video_is_an_input_error(tmp_path):
    (tmp_path / "fake.mp4").write_bytes(b"this is not an mp4" * 100)
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    with pytest.raises(InputError, match="fake.*cannot open the video file"):
        len(video)


def test_video_file_on_s3(mp4_collection, bucket):
    for name in ("synth-000.mp4", "synth-000.groundtruth.txt"):
        with open(f"{mp4_collection}/{name}", "rb") as handle:
            storage.write_bytes(f"s3://{bucket}/videos/{name}", handle.read())
    remote = datasets.open_video(datasets.discover(f"s3://{bucket}/videos").videos[0])
    local = datasets.open_video(datasets.discover(mp4_collection).videos[0])
    assert len(remote) == 40 and remote.groundtruth.valid.all()
    np.testing.assert_array_equal(remote.read_frame(17), local.read_frame(17))
