"""`lgur index --video`: footage -> people crops with where/when -> a searchable index.

For every source (reader.py) frames are sampled at `fps`, people detected in batches of frames
(detectors.py), each box padded (`pad` x its width/height on every side, clipped to the frame) and cropped,
boxes smaller than `min_height` x `min_width` pixels dropped (counted), and the boxes linked into tracks
(tracker.py). The crops are written as JPEG files beside the index, in `OUT.media/`:

    OUT.media/crops/<source>/f<frame>_d<k>.jpg   the padded person crops: the gallery the index encodes
    OUT.media/frames/<source>/f<frame>.jpg       a downscaled copy of every frame that has a crop (context)
    OUT.media/sources.json                       per source: size/mtime, frame rate, crops with frame
                                                 index, time, box, score and track; tracks with time span

Why files rather than reading the crops back from the videos on demand: searching, the sheets and the web
server then never decode video (seeking is slow and frame-inexact for many codecs), they read only files
inside the index's own folders (the server serves nothing else), the results keep working when the
footage is moved or deleted, and the image index machinery (incremental encoding, /img/{id}) applies as is.
The price is disk: about 5 KB per crop and 20 KB per frame with people.

Each index row carries metadata columns (lgur.search.index): video (its key: path relative to the footage
root), frame (index), t (seconds from the start), x1 y1 x2 y2 (the detected box in frame pixels, before
padding), det_score, track ("video#n"), track_start / track_end (seconds), frame_image (relative to
OUT.media), frame_w / frame_h (the original frame size). `Hit.video` reads them back. Re-running processes only new or changed sources (size + mtime), drops deleted ones and,
through `build_index`, encodes only the new crops. Changing the detector or a sampling setting re-processes
everything (said in the report).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lgur.video.detectors import Detector, build_detector, default_detector_name
from lgur.video.reader import VideoError, cv2_or_raise, find_sources, probe, sample_frames
from lgur.video.tracker import IoUTracker

log = logging.getLogger(__name__)

FORMAT = "lgur-video-1"


@dataclass
class VideoSettings:
    """What decides the crops (a change re-processes every source). Defaults: the video: config section."""

    fps: float = 2.0
    detector: str = "auto"
    score_threshold: float | None = None  # None: the detector's own default (0.5)
    pad: float = 0.1
    min_height: int = 48
    min_width: int = 16
    frames_fps: float = 10.0
    frame_batch: int = 8
    frame_width: int = 480
    jpeg_quality: int = 90
    track_iou: float = 0.2
    track_max_gap: float = 3.0
    track_max_shift: float = 0.75

    @classmethod
    def from_config(cls, vcfg, **overrides) -> "VideoSettings":
        s = cls(**{k: vcfg[k] for k in cls.__dataclass_fields__ if k in vcfg})
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s

    def key(self) -> dict:
        return {k: getattr(self, k) for k in ("fps", "detector", "score_threshold", "pad", "min_height", "min_width",
                                              "frames_fps", "frame_width", "track_iou", "track_max_gap",
                                              "track_max_shift")}


@dataclass
class VideoReport:
    sources: int = 0
    processed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    frames: int = 0
    detections: int = 0
    too_small: int = 0
    crops: int = 0
    tracks: int = 0
    reprocess_reason: str = ""
    seconds: float = 0.0
    detector: str = ""

    def summary(self) -> str:
        lines = []
        if self.reprocess_reason:
            lines.append(f"re-processing every source: {self.reprocess_reason}")
        lines.append(f"video: {self.sources} source(s): {len(self.processed)} processed, {len(self.kept)} unchanged, "
                     f"{len(self.removed)} removed, {len(self.skipped)} unreadable; detector {self.detector}")
        if self.processed:
            lines.append(f"  {self.frames} frames sampled, {self.detections} people detected, {self.too_small} too "
                         f"small dropped, {self.crops} crops in {self.tracks} tracks ({self.seconds:.1f} s, "
                         f"{self.frames / max(self.seconds, 1e-9):.1f} frames/s)")
        for s in self.skipped:
            lines.append(f"  skipped {s['path']}: {s['reason']}")
        return "\n".join(lines)


def media_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".media")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _load_state(media: Path) -> dict | None:
    p = media / "sources.json"
    if not p.is_file():
        return None
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s unreadable (%s): every source is processed again", p, e)
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("sources"), dict):
        log.warning("%s is not an lgur video state (%s): every source is processed again", p, FORMAT)
        return None
    return state


def pad_box(box: np.ndarray, pad: float, w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    bw, bh = x2 - x1, y2 - y1
    return (max(0, int(np.floor(x1 - pad * bw))), max(0, int(np.floor(y1 - pad * bh))),
            min(w, int(np.ceil(x2 + pad * bw))), min(h, int(np.ceil(y2 + pad * bh))))


def process_source(source, detector: Detector, settings: VideoSettings, media: Path, bar=None) -> dict:
    """Detect, crop and track one source; writes its crops and frames; returns its state record."""
    cv2 = cv2_or_raise()
    info = probe(source, settings.frames_fps)
    crop_dir, frame_dir = media / "crops" / source.key, media / "frames" / source.key
    for d in (crop_dir, frame_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    tracker = IoUTracker(settings.track_iou, settings.track_max_gap, max_shift=settings.track_max_shift)
    rows, stats = [], {"frames": 0, "detections": 0, "too_small": 0}
    quality = [int(cv2.IMWRITE_JPEG_QUALITY), int(settings.jpeg_quality)]
    size = None

    def flush(batch):
        for (i, t, frame), dets in zip(batch, detector([b[2] for b in batch])):
            h, w = frame.shape[:2]
            stats["detections"] += len(dets)
            bw, bh = dets[:, 2] - dets[:, 0], dets[:, 3] - dets[:, 1]
            ok = (bh >= settings.min_height) & (bw >= settings.min_width)
            stats["too_small"] += int((~ok).sum())
            dets = dets[ok]
            ids = tracker.update(t, dets[:, :4])
            if not len(dets):
                continue
            frame_rel = f"frames/{source.key}/f{i:07d}.jpg"
            s = min(1.0, settings.frame_width / w)
            small = cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA) \
                if s < 1 else frame
            cv2.imwrite(str(media / frame_rel), small, quality)
            for k, (det, tid) in enumerate(zip(dets, ids)):
                x1, y1, x2, y2 = pad_box(det, settings.pad, w, h)
                crop_rel = f"{source.key}/f{i:07d}_d{k:02d}.jpg"
                cv2.imwrite(str(media / "crops" / crop_rel), frame[y1:y2, x1:x2], quality)
                rows.append({"path": crop_rel, "frame": i, "t": round(t, 3),
                             "box": [round(float(v), 1) for v in det[:4]], "score": round(float(det[4]), 4),
                             "track": int(tid), "frame_image": frame_rel, "frame_size": [w, h]})

    batch = []
    for i, t, frame in sample_frames(source, info, settings.fps):
        size = size or frame.shape[:2]
        batch.append((i, t, frame))
        stats["frames"] += 1
        if len(batch) >= settings.frame_batch:
            flush(batch)
            if bar is not None:
                bar.update(len(batch))
            batch = []
    if batch:
        flush(batch)
        if bar is not None:
            bar.update(len(batch))
    if not stats["frames"]:
        raise VideoError("no frame could be decoded")
    tracks: dict[str, list] = {}
    for r in rows:
        tr = tracks.setdefault(str(r["track"]), [r["t"], r["t"], 0])
        tr[0], tr[1], tr[2] = min(tr[0], r["t"]), max(tr[1], r["t"]), tr[2] + 1
    return {"signature": source.signature(), "fps": info.fps, "frames": info.frames,
            "size": [info.width, info.height], **stats, "crops": rows, "tracks": tracks}


def row_meta(key: str, rec: dict, row: dict) -> dict:
    """The index row columns of one crop (lgur.search.index metadata columns: flat int/float/str)."""
    span = rec["tracks"][str(row["track"])]
    x1, y1, x2, y2 = row["box"]
    return {"video": key, "frame": int(row["frame"]), "t": float(row["t"]), "x1": float(x1), "y1": float(y1),
            "x2": float(x2), "y2": float(y2), "det_score": float(row["score"]), "track": f"{key}#{row['track']}",
            "track_start": float(span[0]), "track_end": float(span[1]), "frame_image": row["frame_image"],
            "frame_w": int(row["frame_size"][0]), "frame_h": int(row["frame_size"][1])}


def index_video(checkpoint: str | Path, video: str | Path, out: str | Path, settings: VideoSettings | None = None,
                dtype: str = "fp16", batch_size: int = 64, num_workers: int = 2, device: str | None = None,
                ann: str | None = None, pca: int | None = None, search_cfg=None, progress: bool = True,
                detector: Detector | None = None):
    """Create or update the index at `out` for the people in `video` (file, folder of videos, folder of
    frames). Returns (GalleryIndex, BuildReport, VideoReport)."""
    from tqdm import tqdm

    from lgur.search.index import SearchError, build_index

    t0 = time.perf_counter()
    settings = settings or VideoSettings()
    if not settings.fps > 0:
        raise VideoError(f"--fps must be positive, got {settings.fps}")
    if settings.detector == "auto" and detector is None:
        settings.detector = default_detector_name()
    det = detector or build_detector(settings.detector, settings.score_threshold)
    root, sources = find_sources(video)
    out = Path(out)
    media = media_dir(out)
    if out.exists() and not (out / "manifest.json").is_file():
        raise SearchError(f"{out} exists and is not an lgur index; refusing to write there")
    report = VideoReport(sources=len(sources), detector=det.describe())
    state = _load_state(media)
    if state is not None and state.get("settings") != settings.key():
        report.reprocess_reason = f"settings changed ({state.get('settings')} -> {settings.key()})"
        state = None
    elif state is not None and state.get("root") != str(root):
        report.reprocess_reason = f"the footage root changed ({state.get('root')} -> {root})"
        state = None
    old = state["sources"] if state else {}
    if state is None and media.exists():
        for sub in ("crops", "frames"):
            shutil.rmtree(media / sub, ignore_errors=True)
    media.mkdir(parents=True, exist_ok=True)
    new_state = {"format": FORMAT, "root": str(root), "settings": settings.key(), "sources": {}}
    present = {s.key for s in sources}
    for key in old:
        if key not in present:
            report.removed.append(key)
            for sub in ("crops", "frames"):
                shutil.rmtree(media / sub / key, ignore_errors=True)

    todo = []
    for s in sources:
        try:
            sig = s.signature()
        except OSError as e:
            report.skipped.append({"path": s.key, "reason": f"cannot stat ({e})"})
            continue
        rec = old.get(s.key)
        if rec is not None and rec.get("signature") == sig and (media / "crops" / s.key).is_dir():
            new_state["sources"][s.key] = rec
            report.kept.append(s.key)
        else:
            todo.append(s)
    expected = 0
    for s in todo:
        try:
            info = probe(s, settings.frames_fps)
            expected += math.ceil(info.frames / info.fps * settings.fps - 1e-6) if info.frames > 0 else 0
        except VideoError:
            pass
    t_proc = time.perf_counter()
    with tqdm(total=expected or None, desc="detecting people", unit="frame", disable=not progress) as bar:
        for s in todo:
            try:
                rec = process_source(s, det, settings, media, bar)
            except VideoError as e:
                report.skipped.append({"path": s.key, "reason": str(e)})
                for sub in ("crops", "frames"):
                    shutil.rmtree(media / sub / s.key, ignore_errors=True)
                continue
            new_state["sources"][s.key] = rec
            report.processed.append(s.key)
            report.frames += rec["frames"]
            report.detections += rec["detections"]
            report.too_small += rec["too_small"]
            _atomic_write(media / "sources.json", json.dumps(new_state))  # progress survives an interruption
    report.seconds = time.perf_counter() - t_proc
    new_state["skipped"] = report.skipped
    _atomic_write(media / "sources.json", json.dumps(new_state))
    for key in report.processed:
        rec = new_state["sources"][key]
        report.crops += len(rec["crops"])
        report.tracks += len(rec["tracks"])

    meta = {}
    for key, rec in new_state["sources"].items():
        for row in rec["crops"]:
            meta[row["path"]] = row_meta(key, rec, row)
    if not meta:
        raise VideoError(f"{video}: no people found in {report.frames} sampled frames of {len(sources)} source(s) "
                         f"with {det.describe()}" + (f"; {report.too_small} boxes were smaller than "
                                                     f"{settings.min_width}x{settings.min_height} px"
                                                     if report.too_small else "")
                         + "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in report.skipped))
    index, build = build_index(checkpoint, media / "crops", out, dtype=dtype, batch_size=batch_size,
                               num_workers=num_workers, device=device, ann=ann, pca=pca, search_cfg=search_cfg,
                               progress=progress, metadata=meta)
    return index, build, report
