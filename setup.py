"""Which packages the distribution holds; everything else about it is in pyproject.toml.

The top-level ``configs/`` folder ships as the package ``hyperhuman.configs`` (its YAML files as
package data), so a non-editable install finds its configs through ``importlib.resources``.
pyproject.toml cannot express this: its package discovery does not follow ``package-dir`` onto a
folder outside the package, so the list is built here, for the wheel and the editable install alike.
"""

from setuptools import find_namespace_packages, find_packages, setup

CODE = find_packages(include=["shards*", "annotators*", "pipelines*", "hyperhuman*", "distill*"])
# configs/ and each of its sub-folders (annotate/, lsdm/, ...) is a package whose YAML files are its data.
CONFIG_FOLDERS = find_namespace_packages(where="configs", exclude=["*__pycache__*"])
CONFIGS = ["hyperhuman.configs", *(f"hyperhuman.configs.{name}" for name in CONFIG_FOLDERS)]

setup(
    packages=[*CODE, *CONFIGS],
    package_dir={"hyperhuman.configs": "configs"},
    package_data={name: ["*.yaml"] for name in CONFIGS},
)
