"""YAML configs with ``--set key.sub=value`` overrides.

Every subcommand reads a YAML file from ``configs/`` (or ``--config PATH``). Overrides are
parsed as YAML scalars (``--set writer.max_samples=500``) and must name an existing key, so a
typo fails at start instead of being ignored.

The repository's top-level ``configs/`` folder ships inside the distribution as the package
``hyperhuman.configs`` (``setup.py`` maps it), so an installed wheel finds its configs the
same way an editable install does: through ``importlib.resources``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import json
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


def _config_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("hyperhuman.configs")))
    except ModuleNotFoundError:
        # A source checkout imported without installing it (PYTHONPATH=.), or an editable
        # install made before configs/ became package data: the folder beside the package.
        return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()


def available_configs() -> list[str]:
    """Every shipped config by name, e.g. ``["annotate/full", ..., "lsdm/tiny", ...]``."""
    return sorted(path.relative_to(CONFIG_DIR).with_suffix("").as_posix() for path in CONFIG_DIR.rglob("*.yaml"))


def config_path(name_or_path: str) -> Path:
    """``shards`` → ``configs/shards.yaml``, ``annotate/offline`` → ``configs/annotate/offline.yaml``;
    a name ending in ``.yaml``/``.yml`` is a path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return CONFIG_DIR / f"{name_or_path}.yaml"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """yaml's complaint on one line, with the line and column it points at (1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:  # e.g. a ReaderError (a byte that is no text)
        return " ".join(str(error).split())
    where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark:  # e.g. the line where the unclosed bracket opened
        return f"{where} ({context} from line {context_mark.line + 1})"
    return f"{where} ({context})" if context else where


def _parse_override(override: str, raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML: {_yaml_problem(error)}; "
            "close its brackets and quotes, or quote it as a string"
        ) from error


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
                node[part] = _parse_override(override, raw)
            else:
                node = node[part]
    return config


def load_config(name_or_path: str, overrides: list[str] | None = None) -> dict:
    path = config_path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass --config PATH to a YAML file or one of {available_configs()}"
        )
    # Bytes, so yaml itself decodes them and reports a non-UTF-8 file as a YAMLError with its position.
    with open(path, "rb") as handle:
        try:
            config = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}; fix it there") from error
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    return apply_overrides(config, overrides or [])


def check_known_keys(config: dict, known: dict, reference: str, where: str = "") -> None:
    """Refuse keys a recipe does not read, so a typo, or a key of another recipe, fails at start
    instead of being ignored for an hour. ``known`` maps each key to ``None`` (a value, or a section
    whose keys belong to another library, e.g. a diffusers UNet config) or to a dict (a section,
    checked the same way); ``reference`` is the config file that documents them."""
    for key, value in config.items():
        path = f"{where}{key}"
        if key not in known:
            raise ConfigError(
                f"unknown config key {path!r}; known {'in ' + where.rstrip('.') if where else 'at the top level'}: "
                f"{sorted(known)} (see {reference})"
            )
        if isinstance(known[key], dict) and isinstance(value, dict):
            check_known_keys(value, known[key], reference, f"{path}.")


def documented_keys(known: dict, where: str = "") -> list[str]:
    """Every dotted key of a ``known`` schema (for the test that the shipped configs document them)."""
    keys = []
    for key, value in known.items():
        keys += documented_keys(value, f"{where}{key}.") if isinstance(value, dict) else [f"{where}{key}"]
    return keys


def json_digest(value) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, other values by ``str``): how settings,
    listings and demo stages are told apart."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
