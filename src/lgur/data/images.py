"""Image file checks and decoding shared by the readers, datasets and the decoded-image cache."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

# what PIL raises for a missing, truncated, corrupt or absurdly large image file
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_JPEG_TAIL = 1024  # bytes searched for the end-of-image marker (some writers append padding after it)


def verify_image(path: str | Path) -> str | None:
    """Cheap integrity check without a full decode: header, PIL's verify (chunk CRCs for PNG) and, for
    JPEG, the end-of-image marker that a truncated download lacks. Returns the problem, or None if ok."""
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            if w <= 0 or h <= 0:
                return f"empty image ({w}x{h})"
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(f.tell() - _JPEG_TAIL, 0))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
    except DECODE_ERRORS as e:
        return f"cannot read image ({type(e).__name__}: {e})"
    return None


def load_rgb(path: str | Path) -> Image.Image:
    """Fully decode an image as RGB; raises one of DECODE_ERRORS on a bad file."""
    with Image.open(path) as im:
        return im.convert("RGB")
