"""A simple IoU tracker: links one person's boxes across the sampled frames of a video into a track.

Each live track predicts its next box from its last two (constant velocity, as SORT does without the
Kalman filter), then detections and tracks are matched greedily by IoU, best pairs first. At 2 sampled
frames per second a walker moves a good part of their own width between frames, so both boxes are widened
by `widen` x their width on each side before the IoU is taken (the matching gate only, not the stored
boxes). A detection matched to no track starts one; a track unmatched for more than `max_gap` seconds ends.
"""
from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (n, 4) and b (m, 4), x1, y1, x2, y2."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _widen(boxes: np.ndarray, f: float) -> np.ndarray:
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    return boxes + np.hstack([-f * w, 0 * w, f * w, 0 * w])


class IoUTracker:
    """`update(t, boxes) -> track ids` per sampled frame, in time order. Ids are 0, 1, 2, ... per tracker."""

    def __init__(self, iou_threshold: float = 0.2, max_gap: float = 1.5, widen: float = 0.5):
        self.iou_threshold, self.max_gap, self.widen = iou_threshold, max_gap, widen
        self.tracks: list[dict] = []  # live: {"id", "box", "prev", "t", "t_prev"}
        self.next_id = 0

    def _predict(self, tr: dict, t: float) -> np.ndarray:
        if tr["prev"] is None or tr["t"] <= tr["t_prev"]:
            return tr["box"]
        v = (tr["box"] - tr["prev"]) / (tr["t"] - tr["t_prev"])
        return tr["box"] + v * (t - tr["t"])

    def update(self, t: float, boxes: np.ndarray) -> list[int]:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.tracks = [tr for tr in self.tracks if t - tr["t"] <= self.max_gap]
        ids = [-1] * len(boxes)
        if self.tracks and len(boxes):
            pred = np.stack([self._predict(tr, t) for tr in self.tracks])
            iou = iou_matrix(_widen(pred, self.widen), _widen(boxes, self.widen))
            for flat in np.argsort(-iou, axis=None):
                ti, di = divmod(int(flat), len(boxes))
                if iou[ti, di] < self.iou_threshold:
                    break
                if ids[di] != -1 or self.tracks[ti].get("_used"):
                    continue
                tr = self.tracks[ti]
                tr["_used"] = True
                tr["prev"], tr["t_prev"], tr["box"], tr["t"] = tr["box"], tr["t"], boxes[di], t
                ids[di] = tr["id"]
        for tr in self.tracks:
            tr.pop("_used", None)
        for di, box in enumerate(boxes):
            if ids[di] == -1:
                self.tracks.append({"id": self.next_id, "box": box, "prev": None, "t": t, "t_prev": t})
                ids[di] = self.next_id
                self.next_id += 1
        return ids
