#!/usr/bin/env bash
# Adds the MMPose stack to .venv: the `mmpose`, `dwpose` and `mmdet-detector` annotators and
# their tests need it; `make demo` and the offline defaults do not. Safe to re-run: every step is
# a no-op when already satisfied.
#
#   scripts/setup_mmpose.sh     # `make setup-mmpose` (make test runs it), after scripts/setup.sh
#
# Full mmcv 2.1.0 (with its C++ ops) has no wheel for torch 2.14: it is built from the sdist with
# C++20 once (17-25 min on 2 cores) and the wheel is cached in $HYPERHUMAN_WHEEL_CACHE (default
# ~/.cache/hyperhuman/wheels), so every later set-up installs it in seconds. xtcocotools' PyPI
# wheel is built against the numpy 1 ABI, so it is rebuilt from source for numpy 2.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
CONSTRAINTS=requirements/constraints.txt
WHEEL_CACHE=${HYPERHUMAN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hyperhuman/wheels}
MMCV_VERSION=2.1.0

say() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "scripts/setup_mmpose.sh: no $VENV yet; run make setup (scripts/setup.sh) first" >&2
    exit 1
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

say "MMPose stack: chumpy, mmengine, mmdet, mmpose, xtcocotools (numpy 2 build)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" Cython
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation chumpy
"${PIP[@]}" install -q -c "$CONSTRAINTS" mmengine==0.10.7 mmdet==3.3.0 mmpose==1.3.2
if ! "$VENV/bin/python" -c 'import xtcocotools.mask' 2>/dev/null; then
    "${PIP[@]}" install -q -c "$CONSTRAINTS" --force-reinstall --no-deps --no-build-isolation \
        --no-binary xtcocotools xtcocotools==1.14.3
fi

if ! "$VENV/bin/python" -c 'import mmcv.ops' 2>/dev/null; then
    wheel="$WHEEL_CACHE/mmcv-$MMCV_VERSION-cp311-cp311-linux_x86_64.whl"
    if [ ! -f "$wheel" ]; then
        say "building mmcv $MMCV_VERSION with ops from source (once; 17-25 min on 2 cores) into $WHEEL_CACHE"
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

say "checking the environment with the MMPose stack"
"$VENV/bin/python" scripts/check_env.py --mmpose
