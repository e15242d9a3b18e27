#!/usr/bin/env bash
# Headless Chromium for the gallery browser test (it loads the HTML from disk and checks every
# image). Part of the test set-up (make test runs it), not of make demo. A no-op when a browser is
# there; as root on Debian it installs `chromium` with apt, elsewhere it says what to do and the
# test skips.
#
#   scripts/setup_chromium.sh   # HYPERHUMAN_CHROMIUM=/path/to/chrome picks another browser
set -euo pipefail

say() { printf '\n==> %s\n' "$*"; }

if command -v "${HYPERHUMAN_CHROMIUM:-chromium}" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "Debian chromium (headless browser for the gallery tests)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
else
    say "WARNING: no chromium; install it (apt-get install chromium) or set HYPERHUMAN_CHROMIUM," \
        "else the gallery browser test is skipped"
fi
