"""A simple IoU tracker: links one person's boxes across the sampled frames of a video into a track.

Each live track predicts its next box at constant velocity (as SORT does, without the Kalman filter), the
velocity taken over its last `history` boxes rather than the last two, so that a detector's box jitter does not
throw the prediction off; then detections and tracks are matched in two greedy rounds, best pairs first:
1. by IoU. At 2 sampled frames per second a walker moves a good part of their own width between frames, so
   both boxes are widened by `widen` x their width on each side before the IoU is taken (the matching gate
   only, not the stored boxes);
2. what is left, by the distance between the predicted and the detected box centres, in units of the track's
   box height, up to `max_shift`, for boxes of similar height (ratio at most `max_height_ratio`). This
   continues tracks whose detector boxes jump (a box cut by an occluder, a walker that turned, a prediction
   thrown off by a jittery box), which the IoU round misses: on OpenCV's vtest.avi at 2 fps with
   ssd-mobilenet, IoU alone (and a 1.5 s gap) split ~12 visible walkers into 96 tracks.
A detection matched to no track starts one; a track unmatched for more than `max_gap` seconds ends (a walker
missed by the detector or hidden behind another for a few sampled frames keeps their track).
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


def _greedy(score: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (row, col) taken best score first (higher is better) among the allowed ones, each row and col once."""
    pairs, rows, cols = [], set(), set()
    for flat in np.argsort(-score, axis=None, kind="stable"):
        r, c = divmod(int(flat), score.shape[1])
        if not ok[r, c]:
            continue
        if r not in rows and c not in cols:
            pairs.append((r, c))
            rows.add(r)
            cols.add(c)
    return pairs


class IoUTracker:
    """`update(t, boxes) -> track ids` per sampled frame, in time order. Ids are 0, 1, 2, ... per tracker."""

    def __init__(self, iou_threshold: float = 0.2, max_gap: float = 3.0, widen: float = 0.5,
                 max_shift: float = 0.75, max_height_ratio: float = 1.5, history: int = 4):
        self.iou_threshold, self.max_gap, self.widen = iou_threshold, max_gap, widen
        self.max_shift, self.max_height_ratio = max_shift, max_height_ratio
        self.history = history
        self.tracks: list[dict] = []  # live: {"id", "box", "t", "past": [(t, box), ...] oldest first}
        self.next_id = 0

    def _predict(self, tr: dict, t: float) -> np.ndarray:
        t0, b0 = tr["past"][0]
        if tr["t"] <= t0:
            return tr["box"]
        v = (tr["box"] - b0) / (tr["t"] - t0)
        return tr["box"] + v * (t - tr["t"])

    def update(self, t: float, boxes: np.ndarray) -> list[int]:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.tracks = [tr for tr in self.tracks if t - tr["t"] <= self.max_gap]
        ids = [-1] * len(boxes)
        if self.tracks and len(boxes):
            pred = np.stack([self._predict(tr, t) for tr in self.tracks])
            iou = iou_matrix(_widen(pred, self.widen), _widen(boxes, self.widen))
            pairs = _greedy(iou, iou >= self.iou_threshold)
            if self.max_shift > 0:  # round 2: centre distance among the unmatched
                free_t = np.ones(len(pred), bool)
                free_d = np.ones(len(boxes), bool)
                for ti, di in pairs:
                    free_t[ti] = free_d[di] = False
                h_t = np.maximum(pred[:, 3] - pred[:, 1], 1e-6)
                h_d = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
                c_t = (pred[:, :2] + pred[:, 2:]) / 2
                c_d = (boxes[:, :2] + boxes[:, 2:]) / 2
                shift = np.linalg.norm(c_t[:, None] - c_d[None], axis=-1) / h_t[:, None]
                ratio = np.maximum(h_t[:, None] / h_d[None], h_d[None] / h_t[:, None])
                ok = (shift <= self.max_shift) & (ratio <= self.max_height_ratio) & free_t[:, None] & free_d[None]
                pairs += _greedy(-shift, ok)
            for ti, di in pairs:
                tr = self.tracks[ti]
                tr["box"], tr["t"] = boxes[di], t
                tr["past"] = (tr["past"] + [(t, boxes[di])])[-self.history:]
                ids[di] = tr["id"]
        for di, box in enumerate(boxes):
            if ids[di] == -1:
                self.tracks.append({"id": self.next_id, "box": box, "t": t, "past": [(t, box)]})
                ids[di] = self.next_id
                self.next_id += 1
        return ids
