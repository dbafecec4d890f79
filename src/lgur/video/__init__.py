"""Video footage -> person crops with video, time, box and track -> a searchable index (`lgur index --video`).

    reader     video files, folders of videos, folders of frames; frames sampled at a given rate
    detectors  person detectors by name: ssd-mobilenet, hog, onnx:PATH (all offline)
    tracker    a simple IoU tracker linking one person's boxes across sampled frames
    ingest     the pipeline: detect, pad + crop, track, write crops beside the index, build the index
    synthetic  a rendered test video of synthetic walkers with known boxes and identities

Names resolve lazily so the `lgur` command's parser does not import OpenCV or torch.
"""
from __future__ import annotations

from lgur._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "index_video": "ingest", "VideoSettings": "ingest", "VideoReport": "ingest", "media_dir": "ingest",
    "build_detector": "detectors", "Detector": "detectors", "IoUTracker": "tracker", "find_sources": "reader",
    "sample_frames": "reader", "VideoError": "reader", "render_walkers": "synthetic",
})
