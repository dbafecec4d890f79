"""Containment of gallery paths: nothing outside an index's images root is indexed, loaded or served.

Three checks, one per moment a path is trusted:

    index time   `outside_root`: a file under the images folder whose real location (symlinks resolved) is
                 outside it is skipped and reported (`lgur index --follow-symlinks` indexes it anyway)
    load time    `manifest_path_problem`: a manifest path must be a plain relative path below the root (no
                 absolute path, no `..`, no NUL): an edited manifest naming /etc/passwd is refused
    every /img   `open_gallery_file`: the path is resolved again and opened without following a final
                 symlink, and the opened descriptor's real path is checked (Linux: /proc/self/fd), so a file
                 swapped for a symlink after indexing is refused, not followed

Only the standard library: index.py and server.py both import this module, it imports neither.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_PROC_FD = Path("/proc/self/fd")


class OutsideGallery(Exception):
    """A gallery path that leads outside the images root, or that is not a regular file; str() says why."""


def manifest_path_problem(rel: object) -> str | None:
    """Why `rel` (a manifest's image path) is not a plain relative path below the root; None if it is."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if "\x00" in rel:
        return "contains a NUL byte"
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).anchor:
        return "is absolute"
    if ".." in PurePosixPath(rel).parts or ".." in PureWindowsPath(rel).parts:
        return "climbs out of the images root with '..'"
    return None


def _suspect(rel: object) -> bool:
    """Cheap pre-filter for manifest_path_problem (a million rows are checked at every load)."""
    return (not isinstance(rel, str) or not rel or rel[0] in "/\\" or "\x00" in rel or ".." in rel
            or rel[1:2] == ":")


def manifest_paths_problems(paths, limit: int = 5) -> tuple[int, list[str]]:
    """(number of bad entries, up to `limit` descriptions) for a manifest's image paths."""
    bad, examples = 0, []
    for i, rel in enumerate(paths):
        why = manifest_path_problem(rel) if _suspect(rel) else None
        if why:
            bad += 1
            if len(examples) < limit:
                examples.append(f"row {i}: {str(rel)[:120]!r} {why}")
    return bad, examples


def is_under(path: Path, root: Path) -> bool:
    """`path` is `root` or below it (both already resolved)."""
    return path == root or root in path.parents


def outside_root(path: Path, root: Path) -> Path | None:
    """The real location of `path` when it lies outside the (resolved) `root`, else None."""
    real = path.resolve()
    return None if is_under(real, root) else real


def open_gallery_file(root: Path, rel: str, follow_symlinks: bool = False) -> tuple[int, os.stat_result]:
    """Open image `rel` below the resolved `root` for reading -> (fd, fstat); raises OutsideGallery or OSError.

    follow_symlinks=False (default): the path's real location must be under `root` now, when it is opened
    (the final component is opened with O_NOFOLLOW, and on Linux the descriptor's own path is checked, which
    closes the gap between resolving and opening). True: symlinks inside the gallery are trusted wherever
    they lead (the gallery was indexed with --follow-symlinks); the path itself must still be relative.
    Either way only a regular file is opened (O_NONBLOCK: a FIFO swapped in cannot hang the server).
    """
    why = manifest_path_problem(rel)
    if why:
        raise OutsideGallery(f"path {rel[:120]!r} {why}")
    path = root / rel
    if follow_symlinks:
        fd = os.open(path, _OPEN_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
    else:
        real = path.resolve()
        if not is_under(real, root):
            raise OutsideGallery(f"{rel} leads outside the gallery (to {real})")
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a symlink just now
                raise OutsideGallery(f"{rel} became a symlink") from None
            raise
        try:
            opened = Path(os.readlink(_PROC_FD / str(fd))) if _PROC_FD.is_dir() else real
        except OSError:
            opened = real
        if not is_under(opened, root):
            os.close(fd)
            raise OutsideGallery(f"{rel} leads outside the gallery (to {opened})")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OutsideGallery(f"{rel} is not a regular file")
    return fd, st


def load_gallery_image(root: Path, rel: str, follow_symlinks: bool = False):
    """Decode gallery image `rel` as RGB, read through open_gallery_file (never outside `root`). Raises
    OutsideGallery, OSError or a PIL decode error (lgur.data.images.DECODE_ERRORS)."""
    fd, _ = open_gallery_file(root, rel, follow_symlinks)
    with os.fdopen(fd, "rb") as f, Image.open(f) as im:
        return im.convert("RGB")


def split_gallery(paths: list[Path], root: Path, follow_symlinks: bool = False) -> tuple[list[Path], list[dict]]:
    """Listed gallery files -> (those to index, skipped [{"path", "reason"}]) for the resolved `root`.

    A file whose real location is outside `root` (a symlink, or a path through a symlinked folder) is
    skipped with its target named, unless `follow_symlinks`.
    """
    if follow_symlinks:
        return list(paths), []
    kept, skipped = [], []
    for p in paths:
        real = outside_root(p, root)
        if real is None:
            kept.append(p)
        else:
            skipped.append({"path": p.relative_to(root).as_posix(),
                            "reason": f"symlink leading outside the gallery (to {real}); "
                                      f"`lgur index --follow-symlinks` indexes it"})
    return kept, skipped
