"""Video sources for `lgur index --video`: a video file, a folder of videos, or a folder of frames.

A *source* is one timeline: a video file (decoded with OpenCV's bundled FFmpeg), or a folder whose image
files, in name order, are the frames of one sequence (their frame rate is not stored anywhere, so it is
`frames_fps`, given by the user). `sample_frames` yields the frames nearest to every 1/fps seconds, with
the frame index and its timestamp (index / source frame rate: container timestamps are unreliable across
codecs, and every source here has a constant rate).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lgur.data.images import IMAGE_EXTENSIONS
from lgur.errors import LgurError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv", ".flv", ".ts", ".3gp")
FALLBACK_FPS = 25.0  # a video whose container states no usable frame rate


class VideoError(LgurError):
    """A video path that cannot be read, or a video option that cannot be honoured."""


def cv2_or_raise():
    try:
        import cv2
    except ImportError:
        raise VideoError("video indexing needs OpenCV: pip install 'lgur[video]' "
                         "(or pip install opencv-python-headless)") from None
    return cv2


@dataclass
class Source:
    """One timeline. `key`: its path relative to the root the user named (posix), unique in an index."""

    key: str
    path: Path                   # the video file, or the folder of frames
    frames: list[Path] | None    # frame files of a folder-of-frames source, in order; None for a video file

    def signature(self) -> dict:
        """What decides whether a re-run must process this source again (size + mtime, like image indexes)."""
        if self.frames is None:
            st = self.path.stat()
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        stats = [p.stat() for p in self.frames]
        return {"size": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats),
                "files": len(stats)}


def find_sources(path: str | Path) -> tuple[Path, list[Source]]:
    """(root, sources) for a video file, a folder of videos (recursive) or a folder of frames (every folder
    holding images is one sequence). A folder with both: its videos are the sources."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            log.warning("%s: extension %r is not a known video extension; trying OpenCV anyway", path, path.suffix)
        root = path.parent.resolve()
        return root, [Source(path.name, path.resolve(), None)]
    if not path.is_dir():
        raise VideoError(f"--video: no such file or folder: {path}")
    root = path.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    if videos:
        return root, [Source(p.relative_to(root).as_posix(), p, None) for p in videos]
    by_dir: dict[Path, list[Path]] = {}
    for p in files:
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            by_dir.setdefault(p.parent, []).append(p)
    if not by_dir:
        raise VideoError(f"{root}: no videos ({', '.join(VIDEO_EXTENSIONS)}) and no frame images found")
    sources = []
    for d in sorted(by_dir):
        key = d.relative_to(root).as_posix()
        sources.append(Source(root.name if key == "." else key, d, sorted(by_dir[d])))
    return root, sources


@dataclass
class VideoInfo:
    fps: float          # source frame rate
    frames: int         # frame count as stated by the container (-1 unknown)
    width: int
    height: int


def probe(source: Source, frames_fps: float) -> VideoInfo:
    cv2 = cv2_or_raise()
    if source.frames is not None:
        first = cv2.imread(str(source.frames[0]), cv2.IMREAD_COLOR)
        h, w = first.shape[:2] if first is not None else (0, 0)
        return VideoInfo(float(frames_fps), len(source.frames), w, h)
    cap = cv2.VideoCapture(str(source.path))
    try:
        if not cap.isOpened():
            raise VideoError(f"{source.path}: OpenCV cannot open this video")
        fps = cap.get(cv2.CAP_PROP_FPS)
        if not (math.isfinite(fps) and 0.1 <= fps <= 1000):
            log.warning("%s: the container states no usable frame rate (%r); assuming %s fps", source.path, fps,
                        FALLBACK_FPS)
            fps = FALLBACK_FPS
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or -1)
        return VideoInfo(float(fps), n, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    finally:
        cap.release()


def sample_frames(source: Source, info: VideoInfo, fps: float) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index, timestamp s, BGR frame) for the first frame at or after every multiple of 1/fps.
    Skipped frames are only grabbed (demuxed + decoded, not converted). Unreadable frame files are skipped
    with a warning; a video ends at its first unreadable frame (what OpenCV reports as the end)."""
    cv2 = cv2_or_raise()
    step = 1.0 / fps if fps > 0 else 0.0
    next_t = 0.0
    eps = 0.5 / info.fps  # a frame within half a frame period of the target time is taken

    def due(i: int) -> bool:
        return i / info.fps + eps >= next_t

    if source.frames is not None:
        for i, p in enumerate(source.frames):
            if not due(i):
                continue
            frame = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if frame is None:
                log.warning("%s: unreadable frame image, skipped", p)
                continue
            t = i / info.fps
            next_t = max(next_t + step, t + step - eps) if step else 0.0
            yield i, t, frame
        return
    cap = cv2.VideoCapture(str(source.path))
    try:
        i = 0
        while True:
            if due(i):
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                t = i / info.fps
                next_t = max(next_t + step, t + step - eps) if step else 0.0
                yield i, t, frame
            elif not cap.grab():
                break
            i += 1
    finally:
        cap.release()
