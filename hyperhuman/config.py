"""YAML configs with ``--set key.sub=value`` overrides.

Every subcommand reads a YAML file from ``configs/`` (or ``--config PATH``). Overrides are
parsed as YAML scalars (``--set writer.max_samples=500``) and must name an existing key, so a
typo fails at start instead of being ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_path(name_or_path: str) -> Path:
    """``shards`` → ``configs/shards.yaml``, ``annotate/offline`` → ``configs/annotate/offline.yaml``;
    a name ending in ``.yaml``/``.yml`` is a path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return CONFIG_DIR / f"{name_or_path}.yaml"


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    config = copy.deepcopy(config)
    for override in overrides:
        dotted, sep, raw = override.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"override {override!r} must look like key.subkey=value")
        node = config
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(
                    f"override {override!r}: no key {'.'.join(parts[: depth + 1])!r} in the config; known here: {known}"
                )
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(raw)
            else:
                node = node[part]
    return config


def load_config(name_or_path: str, overrides: list[str] | None = None) -> dict:
    path = config_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH to a YAML file")
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    return apply_overrides(config, overrides or [])
