#!/usr/bin/env bash
# Fetch OpenCV's sample pedestrian footage `vtest.avi` (768x576, 10 fps, 795 frames, people walking across a
# plaza) for the real-footage video test (tests/test_video_real.py) and the video benchmark (bench/video.py).
# It ships in Debian's `opencv-doc` package (Apache-2.0 AND BSD-3-Clause per its copyright file); this
# downloads the .deb with `apt-get download` (no root needed, nothing installed) and extracts only that file.
# Idempotent; prints the path of the file on its last line. Never fails the build: when it cannot fetch, it
# says why and exits 0 (the tests then skip with their own reason).
# Cache folder: $LGUR_CACHE (default ~/.cache/lgur).
set -u

CACHE="${LGUR_CACHE:-$HOME/.cache/lgur}"
DEST="$CACHE/vtest.avi"
MEMBER=./usr/share/doc/opencv-doc/examples/data/vtest.avi

if [ -s "$DEST" ]; then
  echo "ensure_vtest: present"
  echo "$DEST"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "ensure_vtest: apt-get/dpkg-deb not available; the real-footage tests will be skipped"
  exit 0
fi
mkdir -p "$CACHE" || { echo "ensure_vtest: cannot create $CACHE"; exit 0; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 0
LOG="$WORK/log"
# apt-get download works as any user when the package lists are there; refresh them when we may
if ! apt-get download opencv-doc >"$LOG" 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq >>"$LOG" 2>&1; elif sudo -n true 2>/dev/null; then sudo -n apt-get update -qq >>"$LOG" 2>&1; fi
  if ! apt-get download opencv-doc >>"$LOG" 2>&1; then
    echo "ensure_vtest: apt-get download opencv-doc failed; the real-footage tests will be skipped"
    tail -n 3 "$LOG"
    exit 0
  fi
fi
if ! dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x "$MEMBER" 2>>"$LOG" || [ ! -s "$MEMBER" ]; then
  echo "ensure_vtest: opencv-doc has no $MEMBER; the real-footage tests will be skipped"
  exit 0
fi
mv "$MEMBER" "$DEST.tmp.$$" && mv "$DEST.tmp.$$" "$DEST"   # atomic: a half-written file is never seen
echo "ensure_vtest: extracted vtest.avi ($(du -h "$DEST" | cut -f1))"
echo "$DEST"
