"""Rebuild tests/data/vtest_real (a small real test set) and the synthetic renderer's plaza background
from OpenCV's sample video `vtest.avi`.

vtest.avi (768x576, 10 fps, 795 frames, fixed camera over a campus plaza) ships in Debian's `opencv-doc`
package (licence: Apache-2.0 AND BSD-3-Clause per its copyright file). Fetch it without installing:

    apt-get update && apt-get download opencv-doc
    dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x ./usr/share/doc/opencv-doc/examples/data/vtest.avi
    python tools/vtest_real.py ./usr/share/doc/opencv-doc/examples/data/vtest.avi

The boxes below came from OpenCV's HOG people detector on every 8th frame, linked into tracks by IoU;
identities were then checked by eye (tracks that switched people were split, people who might be the
same walker seen twice were left out), and the captions were written by looking at each crop, in the
CUHK-PEDES style (what is visible: clothing, colours, hair, carried things), two per image. The
output uses the CUHK-PEDES layout with every record in the test split, plus the frame and box.

The background (src/lgur/data/backgrounds/vtest_plaza.jpg) is the per-pixel median of every 4th frame:
walkers move, so the median is the empty plaza.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# (person id, frame, [x, y, w, h] in the 768x576 frame, two captions)
CROPS = [
    (1, 632, [608, 207, 72, 143], [
        "A man with short black hair wearing a navy blue puffer jacket with red shoulders and sleeves, dark "
        "blue jeans and white sneakers.",
        "The man is walking away from the camera. He wears a dark padded jacket that is red on top, dark "
        "pants and white shoes."]),
    (1, 744, [236, 171, 70, 139], [
        "A man with black hair in a red and navy blue padded jacket, dark jeans and white shoes. He holds a "
        "white paper in one hand.",
        "This man is wearing a puffy jacket, red across the chest and arms and dark blue below, with dark "
        "blue pants and white sneakers."]),
    (2, 616, [352, 419, 78, 155], [
        "A woman with curly blond shoulder-length hair wearing a long black coat and blue jeans, walking on "
        "the grass.",
        "The lady has fluffy blonde hair. She is wearing a black knee-length coat, dark blue jeans and brown "
        "shoes."]),
    (2, 688, [101, 293, 82, 164], [
        "A woman with short blond hair in a long black coat, blue jeans and dark shoes, walking across a lawn.",
        "A blonde woman is wearing a black coat that reaches her thighs and dark blue jeans."]),
    (3, 456, [514, 206, 70, 140], [
        "A woman with long dark hair wearing a bright red jacket with a grey collar, blue jeans and dark "
        "shoes. She carries something white.",
        "The girl has long brown hair. She is wearing a red puffer jacket and faded blue jeans."]),
    (3, 440, [595, 228, 74, 149], [
        "A young woman in a red jacket and tight blue jeans, with long dark hair, holding a white paper.",
        "A woman walking in a short red coat with a fur collar, light blue jeans and black shoes."]),
    (4, 496, [590, 240, 78, 157], [
        "A man with short dark hair and glasses wearing a black coat, black pants and grey shoes.",
        "The man is dressed all in black: a black jacket and black trousers. He has dark hair."]),
    (4, 576, [618, 283, 74, 147], [
        "A man in glasses wearing a black jacket, black pants and grey sneakers, raising one arm.",
        "This man has short black hair. He wears a long black coat and black trousers."]),
    (5, 520, [472, 187, 70, 140], [
        "A balding man in a black jacket and blue jeans, walking away from the camera.",
        "This man has very short hair and wears a dark jacket, light blue jeans and black shoes."]),
    (5, 536, [424, 148, 76, 153], [
        "A man with a bald head wearing a black jacket, blue jeans and dark shoes, seen from the back.",
        "The man wears a short black coat and faded blue jeans."]),
    (6, 152, [554, 192, 75, 149], [
        "A man with short black hair wearing a navy sweater with dark horizontal stripes, light blue jeans "
        "and white sneakers.",
        "The man has dark skin. He wears a dark blue striped top, pale blue jeans and white shoes."]),
    (6, 184, [310, 174, 68, 136], [
        "A man in a dark blue striped jumper and light blue jeans with white shoes.",
        "A black man wearing a navy long-sleeved top with stripes and baggy light blue jeans."]),
    (7, 264, [292, 175, 71, 141], [
        "A man with dark hair in a dark brown jacket and blue jeans, walking away.",
        "The man wears a short brown leather jacket, blue jeans and brown shoes."]),
    (7, 416, [275, 178, 69, 137], [
        "A man in a dark brown jacket and light blue jeans, seen from behind, with one hand at his head.",
        "This man has dark hair and is wearing a brown jacket and blue jeans."]),
    (8, 752, [336, 160, 67, 134], [
        "A man with dark hair wearing a black jacket with a grey hood, black pants and dark shoes, holding a "
        "white paper.",
        "The man has on a dark jacket with a gray hooded collar and black trousers."]),
]
PAD = 0.04  # box padding (fraction of its size) on every side
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import cv2
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video", help="path to vtest.avi")
    ap.add_argument("--out", default=str(ROOT / "tests/data/vtest_real"))
    ap.add_argument("--background", default=str(ROOT / "src/lgur/data/backgrounds/vtest_plaza.jpg"))
    args = ap.parse_args()
    cap = cv2.VideoCapture(args.video)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    if len(frames) != 795:
        raise SystemExit(f"{args.video}: {len(frames)} frames, expected vtest.avi's 795")
    out = Path(args.out)
    (out / "imgs/test").mkdir(parents=True, exist_ok=True)
    records, seen = [], {}
    for pid, fi, (x, y, w, h), captions in CROPS:
        px, py = round(w * PAD), round(h * PAD)
        x0, y0 = max(x - px, 0), max(y - py, 0)
        crop = frames[fi][y0:min(y + h + py, 576), x0:min(x + w + px, 768)]
        k = seen[pid] = seen.get(pid, -1) + 1
        rel = f"test/{pid:03d}_{k}_f{fi:03d}.jpg"
        cv2.imwrite(str(out / "imgs" / rel), crop, [cv2.IMWRITE_JPEG_QUALITY, 92])
        records.append({"file_path": rel, "captions": captions,
                        "processed_tokens": [re.findall(r"[a-z0-9]+", c.lower()) for c in captions],
                        "id": pid, "split": "test", "frame": fi, "box": [x0, y0, crop.shape[1], crop.shape[0]]})
    (out / "reid_raw.json").write_text(json.dumps(records, indent=1))
    background = np.median(np.stack(frames[::4]), axis=0).astype(np.uint8)
    Path(args.background).parent.mkdir(parents=True, exist_ok=True)
    small = cv2.resize(background, (384, 288), interpolation=cv2.INTER_AREA)
    cv2.imwrite(args.background, small, [cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"{len(records)} crops of {len(seen)} people -> {out}; background -> {args.background}")


if __name__ == "__main__":
    main()
