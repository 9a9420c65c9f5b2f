"""Named experiment splits (exp1/exp2/exp3) and the manifest that tells the scorer which frames to exclude."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rolo_batch import splits
from rolo_batch.errors import ConfigError, InputError


def test_packaged_otb30_lists_the_papers_thirty_videos():
    table = splits.otb30()
    assert len(table) == 30 and len({v.name for v in table}) == 30
    dog = next(v for v in table if v.name == "Dog")
    assert (dog.width, dog.height, dog.frames, dog.train_frames, dog.exp1) == (352, 240, 127, 42, "train")


def test_exp1_from_otb30_trains_on_22_and_tests_on_8():
    split = splits.get_split("exp1")
    assert len(split.train_videos) == 22 and len(split.test_videos) == 8
    assert {"Skater", "Skater2", "Dancer", "Dancer2", "CarScale", "Gym", "Human8", "Jump"} == split.test_videos
    frames = np.arange(1, 11)
    assert split.target_mask("Dog", frames).all() and not split.test_mask("Dog", frames).any()
    assert split.test_mask("Jump", frames).all() and not split.input_mask("Jump", frames).any()
    assert not split.target_mask("Jump", frames).any()


def test_exp1_refuses_a_video_in_neither_list_by_name():
    split = splits.get_split("exp1")
    with pytest.raises(InputError, match="Basketball.*not in the train or the test videos"):
        split.test_mask("Basketball", np.arange(1, 5))


def test_exp1_reads_user_video_lists_from_files(tmp_path):
    (tmp_path / "train.txt").write_text("# my training videos\nalpha\n\nbeta  # the second one\n")
    (tmp_path / "test.txt").write_text("gamma\n")
    split = splits.get_split("exp1", train_list=str(tmp_path / "train.txt"), test_list=str(tmp_path / "test.txt"))
    assert split.train_videos == {"alpha", "beta"} and split.test_videos == {"gamma"}
    with pytest.raises(InputError, match="Dog"):
        split.role("Dog")


@pytest.mark.parametrize("options, message", [
    ({"train_videos": ["a"], "test_videos": ["a", "b"]}, "both the train and the test"),
    ({"train_videos": ["a"]}, "both a train and a test"),
    ({"train_videos": [], "test_videos": ["b"]}, "train list is empty"),
])
def test_exp1_refuses_inconsistent_video_lists(options, message):
    with pytest.raises(ConfigError, match=message):
        splits.get_split("exp1", **options)


def test_unknown_split_and_lists_for_frame_splits_are_config_errors():
    with pytest.raises(ConfigError, match="exp1, exp2, exp3"):
        splits.get_split("exp4")
    with pytest.raises(ConfigError, match="exp1 only"):
        splits.get_split("exp2", train_videos=["a"], test_videos=["b"])


def test_exp2_uses_the_csv_first_part_for_otb30_and_a_third_elsewhere():
    split = splits.get_split("exp2")
    dog = np.arange(1, 128)  # Dog: 127 frames, 42 train frames in otb30.csv
    np.testing.assert_array_equal(np.flatnonzero(split.train_frame_mask("Dog", dog)), np.arange(42))
    np.testing.assert_array_equal(split.test_mask("Dog", dog), ~split.train_frame_mask("Dog", dog))
    human2 = np.arange(1, 1129)  # 1128 frames: the csv says 250, not floor(1128 / 3) = 376
    assert split.train_frame_mask("Human2", human2).sum() == 250
    other = np.arange(5, 15)  # an unknown 10-frame video starting at frame 5
    np.testing.assert_array_equal(other[split.train_frame_mask("synthetic-1", other)], [5, 6, 7])
    assert splits.get_split("exp2", first_part="third").train_frame_mask("Human2", human2).sum() == 376


def test_first_part_follows_frame_order_not_row_order():
    shuffled = np.array([9, 3, 7, 1, 5, 2, 8, 4, 6])
    mask = splits.get_split("exp2").train_frame_mask("v", shuffled)
    assert sorted(shuffled[mask]) == [1, 2, 3]


def test_an_otb30_name_with_another_length_falls_back_to_a_third_with_a_warning():
    # OTB-100's Diving has 215 frames, OTB30's 214 (71 train frames): the job must go on, with the stated rule
    split = splits.get_split("exp2")
    diving, dog = np.arange(1, 216), np.arange(1, 128)
    assert split.first_part_rule("Diving", 215) == (71, "third")
    assert split.first_part_rule("Dog", 127) == (42, "otb30")
    assert split.train_frame_mask("Dog", np.arange(1, 101)).sum() == 33  # floor(100 / 3), not the csv's 42
    warnings = splits.first_part_warnings(split, {"Diving": 215, "Dog": 127, "synthetic-1": 10})
    assert len(warnings) == 1
    assert warnings[0].startswith("Diving: 215 frames, but otb30.csv lists 214 (71 train frames)")
    assert "floor(N/3) = 71" in warnings[0] and "--first-part third" in warnings[0]
    manifest = splits.split_manifest(split, {"Diving": diving, "Dog": dog})
    assert manifest["videos"]["Diving"]["first_part_rule"] == "third"
    assert manifest["videos"]["Dog"]["first_part_rule"] == "otb30"
    assert splits.first_part_warnings(splits.get_split("exp2", first_part="third"), {"Diving": 215}) == []


def test_exp3_reads_every_frame_but_targets_only_the_first_part():
    exp2, exp3 = splits.get_split("exp2"), splits.get_split("exp3")
    frames = np.arange(1, 31)
    valid = np.ones(30, bool)
    valid[4] = False
    assert exp3.input_mask("v", frames).all()
    np.testing.assert_array_equal(exp2.input_mask("v", frames), frames <= 10)
    np.testing.assert_array_equal(exp3.target_mask("v", frames, valid), (frames <= 10) & valid)
    np.testing.assert_array_equal(exp3.test_mask("v", frames), frames > 10)
    assert exp3.loss_steps == "all" and exp2.loss_steps == "last"


@pytest.mark.parametrize("name", splits.SPLIT_NAMES)
def test_train_and_test_frames_never_overlap(name):
    split = splits.get_split(name)
    for video in ("Dog", "Jump"):
        frames = np.arange(1, 1 + next(v.frames for v in splits.otb30() if v.name == video))
        assert not (split.train_frame_mask(video, frames) & split.test_mask(video, frames)).any()


def test_frame_ranges_round_trip():
    frames = np.array([1, 2, 3, 7, 9, 10])
    assert splits.frames_to_ranges(frames) == [[1, 3], [7, 7], [9, 10]]
    np.testing.assert_array_equal(splits.ranges_to_frames(splits.frames_to_ranges(frames)), frames)
    assert splits.frames_to_ranges([]) == [] and len(splits.ranges_to_frames([])) == 0


@pytest.mark.parametrize("name", ["exp2", "exp3"])
def test_manifest_round_trips_through_json_and_storage(name, tmp_path):
    split = splits.get_split(name)
    videos = {"Dog": np.arange(1, 128), "synthetic": np.array([1, 2, 3, 4, 5, 6, 8, 9, 10])}
    manifest = json.loads(json.dumps(splits.split_manifest(split, videos)))
    assert manifest["split"]["name"] == name
    np.testing.assert_array_equal(splits.test_frames_from_manifest(manifest, "Dog"), np.arange(43, 128))
    np.testing.assert_array_equal(splits.train_frames_from_manifest(manifest, "Dog"), np.arange(1, 43))
    np.testing.assert_array_equal(splits.test_frames_from_manifest(manifest, "synthetic"), [4, 5, 6, 8, 9, 10])
    assert manifest["videos"]["Dog"]["test"] == [[43, 127]]
    splits.write_manifest(str(tmp_path / "split.json"), manifest)
    assert splits.read_manifest(str(tmp_path / "split.json")) == manifest


def test_manifest_of_exp1_and_its_errors():
    manifest = splits.split_manifest(splits.get_split("exp1"), {"Dog": np.arange(1, 11), "Jump": np.arange(1, 6)})
    assert len(splits.test_frames_from_manifest(manifest, "Dog")) == 0
    np.testing.assert_array_equal(splits.test_frames_from_manifest(manifest, "Jump"), np.arange(1, 6))
    with pytest.raises(InputError, match="Car4.*not in the manifest"):
        splits.test_frames_from_manifest(manifest, "Car4")
    with pytest.raises(InputError, match="not a split manifest"):
        splits.test_frames_from_manifest({"videos": {}}, "Dog")
    with pytest.raises(InputError, match="Unknown"):
        splits.split_manifest(splits.get_split("exp1"), {"Unknown": np.arange(1, 4)})
