#!/usr/bin/env bash
# Creates (or refreshes) .venv with the core environment, everything `make demo` and the offline
# pipeline need, then checks that it is consistent. Safe to re-run: every step is a no-op when
# already satisfied.
#
#   scripts/setup.sh            # `make setup` (make demo, make test, make bench run it): ~3 min fresh
#
# Not part of it, each its own step with its own Makefile stamp:
#   * the MMPose stack (mmcv built from source once, ~20 min, then cached; mmdet, mmpose,
#     xtcocotools): scripts/setup_mmpose.sh, `make setup-mmpose` (make test runs it);
#   * headless Chromium for the gallery browser test: scripts/setup_chromium.sh (make test runs it).
#
# mediapipe 0.10.21 (the last release with the legacy `solutions` and bundled .tflite models)
# pins numpy<2 / protobuf<5 in its metadata but runs on numpy 2 + protobuf 6: it is installed
# with --no-deps; its runtime needs are in pyproject.toml.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv
CONSTRAINTS=requirements/constraints.txt

say() { printf '\n==> %s\n' "$*"; }

if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    say "$VENV is not Python 3.11: recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

say "pip, build tools"
"${PIP[@]}" install -q -c "$CONSTRAINTS" pip "setuptools<81" wheel

say "project and pinned dependencies (torch comes from local disk: ~1 min on a fresh venv)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[dev]"

say "mediapipe 0.10.21 (--no-deps: its numpy<2 pin is wrong for us)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps mediapipe==0.10.21

say "checking the core environment"
"$VENV/bin/python" scripts/check_env.py
