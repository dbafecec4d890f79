"""A rendered test video: synthetic people (lgur.data.synth's renderer) walking across a street scene.

`render_walkers(path, identities)` writes an MJPG .avi with OpenCV's VideoWriter and returns the ground
truth: every frame's visible people as (walker index, x1, y1, x2, y2), boxes from each person's drawn
pixels. Walkers keep to lanes at different depths (farther = higher and smaller, drawn first), move at
constant speed, alternate directions so that neighbours pass each other, and a gait cycle of poses is
repeated. Used by the tests and bench/video.py; everything is seeded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lgur.data.synth import _background, _Body, _draw_person  # the dataset's own renderer
from lgur.video.reader import VideoError, cv2_or_raise

_SS = 2  # supersampling of the person sprites


def _sprite(a: dict, height: float, rng: np.random.Generator):
    """RGBA image of one person (alpha = drawn pixels), the offset of the body centre line / head top, and
    the bounding box of the drawn pixels."""
    H = int(round(height * 1.04 * _SS))
    W = int(round(height * 0.7 * _SS))
    canvas = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    body = _Body(W / 2, 0.01 * H, height * _SS)
    _draw_person(ImageDraw.Draw(canvas), body, a, rng)
    small = canvas.resize((W // _SS, H // _SS), Image.BOX)
    # soft top-down lighting and cloth texture: flat fills look like a drawing, not a camera image
    rgba = np.asarray(small, dtype=np.float32)
    light = np.linspace(1.1, 0.8, rgba.shape[0])[:, None, None]
    rgba[..., :3] = np.clip(rgba[..., :3] * light + rng.normal(0, 8, rgba[..., :3].shape), 0, 255)
    small = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    box = small.getchannel("A").point(lambda v: 255 if v > 127 else 0).getbbox()
    return small, (W // _SS // 2, int(0.01 * H / _SS)), box


def render_walkers(path: str | Path, identities: list[dict], seconds: float = 10.0, fps: float = 10.0,
                   size: tuple[int, int] = (640, 480), seed: int = 0) -> dict:
    """Write the video; returns {"fps", "frames", "size", "boxes": [[(walker, x1, y1, x2, y2), ...] per frame]}.
    A person cut by the frame edge is left out of the ground truth (only whole people count)."""
    cv2 = cv2_or_raise()
    W, H = size
    n_frames = int(round(seconds * fps))
    rng = np.random.default_rng([seed, 0x71DE0])
    background = np.asarray(_background(rng, H, W).convert("RGB"), dtype=np.float32)
    n = len(identities)
    lanes = np.linspace(0.7, 0.98, max(n, 1)) * H   # feet height per walker
    heights = lanes * 0.55                              # perspective: nearer lanes are lower and taller
    direction = np.array([1 if k % 2 == 0 else -1 for k in range(n)])
    speed = rng.uniform(28, 48, n) * (W / 640)           # px/s
    start = np.where(direction > 0, rng.uniform(0.08, 0.3, n), rng.uniform(0.7, 0.92, n)) * W
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write an MJPG video here")
    truth, sprites = [], {}
    try:
        for f in range(n_frames):
            t = f / fps
            frame = Image.fromarray(background.astype(np.uint8))
            boxes = []
            for k in np.argsort(lanes):  # far lanes first: nearer walkers occlude them
                key = (int(k), (f // 2) % 6)  # a six-pose gait cycle
                if key not in sprites:
                    sprites[key] = _sprite(identities[k], heights[k], np.random.default_rng([seed, *key]))
                sprite, (cx, top), bx = sprites[key]
                x = int(round(start[k] + direction[k] * speed[k] * t)) - cx
                y = int(round(lanes[k] - heights[k])) - top
                frame.paste(sprite, (x, y), sprite)
                if bx is None:
                    continue
                x1, y1, x2, y2 = bx[0] + x, bx[1] + y, bx[2] + x, bx[3] + y
                if x1 >= 0 and y1 >= 0 and x2 <= W and y2 <= H:
                    boxes.append((int(k), x1, y1, x2, y2))
            noise = np.random.default_rng([seed, f]).integers(-4, 5, (H, W, 3), dtype=np.int16)
            img = np.clip(np.asarray(frame, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            writer.write(cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), (0, 0), 1.0))  # camera softness
            truth.append(boxes)
    finally:
        writer.release()
    return {"fps": fps, "frames": n_frames, "size": [W, H], "boxes": truth}
