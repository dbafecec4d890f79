#!/usr/bin/env bash
# Make headless Chromium + chromedriver available for the browser test (tests/test_search_serve.py).
# Idempotent: does nothing when both are installed. Installs Debian's `chromium` and `chromium-driver` with
# apt-get when they are missing and apt is usable (root, or passwordless sudo). Never fails the build: when
# it cannot install, it says why and exits 0 (the browser test then skips with its own reason).
set -u

have() { command -v "$1" >/dev/null 2>&1; }

if (have chromium || have chromium-browser) && have chromedriver; then
  echo "ensure_chromium: chromium and chromedriver present"
  exit 0
fi
if ! have apt-get; then
  echo "ensure_chromium: chromium/chromedriver missing and apt-get not available; the browser test will be skipped"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif have sudo && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "ensure_chromium: chromium/chromedriver missing and no root or passwordless sudo to install them;" \
       "run: apt-get install -y chromium chromium-driver (the browser test will be skipped)"
  exit 0
fi
echo "ensure_chromium: installing chromium chromium-driver with apt-get (about a minute)"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq >/tmp/ensure_chromium.log 2>&1 \
   || ! $SUDO apt-get install -y -qq chromium chromium-driver >>/tmp/ensure_chromium.log 2>&1; then
  echo "ensure_chromium: apt-get failed (last lines of /tmp/ensure_chromium.log below); the browser test will be skipped"
  tail -n 5 /tmp/ensure_chromium.log
  exit 0
fi
if (have chromium || have chromium-browser) && have chromedriver; then
  echo "ensure_chromium: installed $(chromedriver --version 2>/dev/null | head -n 1)"
else
  echo "ensure_chromium: apt-get finished but chromium/chromedriver are still not on PATH; the browser test will be skipped"
fi
exit 0
