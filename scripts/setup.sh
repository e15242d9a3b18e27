#!/usr/bin/env bash
# Creates (or refreshes) .venv with everything the project needs, then checks that the
# environment is consistent. Safe to re-run: every step is a no-op when already satisfied.
#
#   scripts/setup.sh            # called by `make setup`
#
# Two parts cannot come from a plain `pip install -e .`:
#   * mediapipe 0.10.21 (the last release with the legacy `solutions` and bundled .tflite
#     models) pins numpy<2 / protobuf<5 in its metadata but runs on numpy 2 + protobuf 6:
#     installed with --no-deps; its runtime needs are in pyproject.toml.
#   * the MMPose stack needs full mmcv 2.1.0, which has no wheel for torch 2.14: it is built
#     from the sdist with C++20 once (~17 min on 2 cores) and the wheel is cached in
#     $HYPERHUMAN_WHEEL_CACHE (default ~/.cache/hyperhuman/wheels) for every later set-up.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv
CONSTRAINTS=requirements/constraints.txt
WHEEL_CACHE=${HYPERHUMAN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hyperhuman/wheels}
MMCV_VERSION=2.1.0

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
"${PIP[@]}" install -q -c "$CONSTRAINTS" pip "setuptools<81" wheel Cython

say "project and pinned dependencies (torch comes from local disk: ~1 min on a fresh venv)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[dev]"

say "mediapipe 0.10.21 (--no-deps: its numpy<2 pin is wrong for us)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps mediapipe==0.10.21

say "MMPose stack: chumpy, mmengine, mmdet, mmpose, xtcocotools (numpy 2 build)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation chumpy
"${PIP[@]}" install -q -c "$CONSTRAINTS" mmengine==0.10.7 mmdet==3.3.0 mmpose==1.3.2
if ! "$VENV/bin/python" -c 'import xtcocotools.mask' 2>/dev/null; then
    # The PyPI wheel is built against the numpy 1 ABI and fails to import on numpy 2.
    "${PIP[@]}" install -q -c "$CONSTRAINTS" --force-reinstall --no-deps --no-build-isolation \
        --no-binary xtcocotools xtcocotools==1.14.3
fi

if ! "$VENV/bin/python" -c 'import mmcv.ops' 2>/dev/null; then
    wheel="$WHEEL_CACHE/mmcv-$MMCV_VERSION-cp311-cp311-linux_x86_64.whl"
    if [ ! -f "$wheel" ]; then
        say "building mmcv $MMCV_VERSION with ops from source (once; ~17 min on 2 cores) into $WHEEL_CACHE"
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        "${PIP[@]}" download -q --no-deps --no-binary mmcv --no-build-isolation -d "$build" "mmcv==$MMCV_VERSION"
        tar xzf "$build/mmcv-$MMCV_VERSION.tar.gz" -C "$build"
        # torch 2.14's headers need C++20; mmcv's setup.py asks for C++14/17.
        sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
        mkdir -p "$WHEEL_CACHE"
        (cd "$build/mmcv-$MMCV_VERSION" && FORCE_CUDA=0 MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
            "$OLDPWD/$VENV/bin/python" -m pip wheel -q . --no-deps --no-build-isolation -w "$build/wheel")
        mv "$build"/wheel/mmcv-*.whl "$wheel.tmp" && mv "$wheel.tmp" "$wheel"
    fi
    say "installing cached $wheel"
    "${PIP[@]}" install -q --no-deps --force-reinstall "$wheel"
fi

# Debian's Chromium, headless: the gallery tests load the HTML from disk and check every image.
if ! command -v "${HYPERHUMAN_CHROMIUM:-chromium}" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "Debian chromium (headless browser for the gallery tests)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
    else
        say "WARNING: no chromium; install it (apt-get install chromium) or set HYPERHUMAN_CHROMIUM," \
            "else the gallery browser test is skipped"
    fi
fi

say "checking the environment"
"$VENV/bin/python" scripts/check_env.py
