"""Video collections: OTB folders and video files, local or on S3, and the synthetic generator.

``discover(root)`` lists the videos under a collection root as picklable ``VideoRef``s (what a Ray job
shards); ``open_video(ref)`` opens one as a ``VideoSource`` (frames + aligned ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rolo_batch import storage
from rolo_batch.datasets.base import Alignment, Frame, VideoRef, VideoSource, check_video_name
from rolo_batch.datasets.groundtruth import GroundTruth, format_groundtruth, parse_groundtruth
from rolo_batch.datasets.otb import IMAGE_DIR, OtbSequence, otb_refs
from rolo_batch.datasets.videofile import SIDECAR_SUFFIX, VIDEO_EXTENSIONS, VideoFile, sidecar_name
from rolo_batch.errors import InputError

__all__ = [
    "Alignment", "Discovery", "Frame", "GroundTruth", "VideoRef", "VideoSource", "check_video_name",
    "discover", "format_groundtruth", "open_video", "parse_groundtruth",
]


@dataclass
class Discovery:
    """What ``discover`` found: the videos, and the entries it rejected (with the reason)."""

    root: str
    videos: list[VideoRef] = field(default_factory=list)
    rejected: list[InputError] = field(default_factory=list)

    def require_videos(self) -> list[VideoRef]:
        """The videos, or an ``InputError`` that says what a collection should look like."""
        if not self.videos:
            raise InputError("no videos found: expected OTB folders (<video>/img/0001.jpg, "
                             "<video>/groundtruth_rect.txt) or video files (.mp4, .avi) with optional "
                             f"<name>{SIDECAR_SUFFIX} sidecars", path=self.root)
        return self.videos


def discover(root_uri: str, names: list[str] | None = None) -> Discovery:
    """Find the videos under ``root_uri`` (local or S3), sorted by name.

    ``root_uri`` may be a collection folder, a single OTB sequence folder, or a single video file.
    Entries starting with ``.`` or ``_`` are ignored; entries with unsafe names are rejected.
    ``names`` keeps only the videos listed (an unknown name is an error).
    """
    found = Discovery(root=root_uri)
    if storage.is_file(root_uri):
        _add_file(found, root_uri, storage.basename(root_uri), set())
    else:
        entries = storage.list_dir(root_uri)
        if any(e.is_dir and e.name == IMAGE_DIR for e in entries):
            _add_otb(found, root_uri, storage.basename(root_uri), entries)
        else:
            file_names = {e.name for e in entries if not e.is_dir}
            for entry in entries:
                if entry.name.startswith((".", "_")):
                    continue
                if entry.is_dir:
                    children = storage.list_dir(entry.uri)
                    if any(c.is_dir and c.name == IMAGE_DIR for c in children):
                        _add_otb(found, entry.uri, entry.name, children)
                elif entry.name.lower().endswith(VIDEO_EXTENSIONS):
                    _add_file(found, entry.uri, entry.name, file_names)
    found.videos.sort(key=lambda r: r.name)
    if names is not None:
        by_name = {r.name: r for r in found.videos}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InputError(f"video(s) {', '.join(unknown)} not found (found: "
                             f"{', '.join(sorted(by_name)) or 'none'})", path=root_uri)
        found.videos = [by_name[n] for n in names]
    return found


def _add_otb(found: Discovery, uri: str, name: str, entries: list[storage.Entry]) -> None:
    for ref in otb_refs(uri, name, entries):
        _accept(found, ref)


def _add_file(found: Discovery, uri: str, file_name: str, siblings: set[str]) -> None:
    stem = file_name.rsplit(".", 1)[0]
    sidecar = sidecar_name(file_name)
    parent = uri[: -len(file_name)].rstrip("/")
    has_sidecar = sidecar in siblings if siblings else storage.is_file(storage.join(parent, sidecar))
    _accept(found, VideoRef(stem, "file", uri, storage.join(parent, sidecar) if has_sidecar else None))


def _accept(found: Discovery, ref: VideoRef) -> None:
    try:
        check_video_name(ref.name, where=ref.uri)
    except InputError as exc:
        found.rejected.append(exc)
        return
    if any(v.name == ref.name for v in found.videos):
        found.rejected.append(InputError(f"two videos are named {ref.name!r}; rename one", path=ref.uri))
        return
    found.videos.append(ref)


def open_video(ref: VideoRef) -> VideoSource:
    """Open the video ``ref`` points to (nothing is decoded until frames are read)."""
    if ref.kind == "otb":
        return OtbSequence(ref)
    if ref.kind == "file":
        return VideoFile(ref)
    raise InputError(f"unknown video kind {ref.kind!r}", video=ref.name, path=ref.uri)
