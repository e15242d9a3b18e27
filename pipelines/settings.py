"""The annotate job's settings, checked at start: every key known, every value of the right type
and range, the output a folder we can write to. A bad ``--set`` fails before Ray starts and before
anything is written, with one line naming the key, what it takes and the value it got.

The rules are a table (:data:`RULES`) so that adding a key is one line; the sections that have
their own checks (``fetch``: :func:`pipelines.fetch.check_fetch`; ``annotators``: the registry)
are checked by those. The optional curation steps (``annotators.aesthetic``,
``annotators.outpaint``) have their options checked here too (:data:`CURATION_OPTIONS`), so a bad
margin fails at start, not when an actor loads the model.
"""

from __future__ import annotations

import math
import posixpath
import uuid
from collections.abc import Callable
from typing import NamedTuple

import fsspec

from hyperhuman.config import ConfigError, check_known_keys
from pipelines.fetch import DEFAULT_FETCH, check_fetch
from pipelines.filters import DEFAULT_FILTERS, OPTIONAL_FILTERS

REFERENCE = "configs/annotate/offline.yaml"
CURATION_REFERENCE = "configs/annotate/full.yaml"  # the config that turns the curation steps on
DEFAULT_MAX_CAPTION_BYTES = 4096  # source.max_caption_bytes: a longer caption is a rejected row
PROBE_PREFIX = ".hyperhuman-write-probe-"


class Rule(NamedTuple):
    expected: str  # completes "KEY must be ..."
    accepts: Callable[[object], bool]


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is not 1 here


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(least: int, most: int | None = None) -> Rule:
    expected = f"an integer ≥ {least}" if most is None else f"an integer in [{least}, {most}]"
    return Rule(expected, lambda value: _is_integer(value) and value >= least and (most is None or value <= most))


def number(least: float, most: float | None = None) -> Rule:
    expected = f"a number ≥ {least}" if most is None else f"a number in [{least}, {most}]"
    return Rule(expected, lambda value: _is_number(value) and value >= least and (most is None or value <= most))


MAPPING = Rule("a mapping", lambda value: isinstance(value, dict))
STRING = Rule("a string", lambda value: isinstance(value, str))
STRING_OR_NULL = Rule("a string or null", lambda value: value is None or isinstance(value, str))

RESOURCES = {"num_cpus": number(0), "num_gpus": number(0), "memory": integer(0)}  # Ray's per-task resources

# Dotted key → rule, sections before their keys (so a key is looked up only inside a mapping).
# A key that is absent takes the job's default, except the REQUIRED ones.
RULES = {
    "partition_size": integer(1),
    **dict.fromkeys(["source", "fetch", "filters", "annotators", "writer", "ray"], MAPPING),
    **dict.fromkeys(["ray.fetch", "ray.annotate", "ray.write"], MAPPING),
    "source.url_column": STRING,
    "source.caption_column": STRING_OR_NULL,
    "source.storage_options": MAPPING,
    "source.max_caption_bytes": integer(1),
    "filters.min_side": integer(1),
    "filters.max_aspect": number(1),
    "filters.min_people": integer(0),
    "filters.max_people": integer(0),
    "filters.min_person_area": number(0, 1),
    "filters.min_aesthetic": number(0, 10),  # the AVA scale of the LAION aesthetic predictor
    "writer.storage_options": MAPPING,
    "writer.max_samples": integer(1),
    "writer.max_bytes": integer(1),
    "writer.jpeg_quality": integer(1, 100),
    **{f"ray.fetch.{key}": rule for key, rule in RESOURCES.items()},
    **{f"ray.annotate.{key}": rule for key, rule in RESOURCES.items()},
    "ray.annotate.actors": integer(1),
    "ray.annotate.batch_size": integer(1),
    "ray.annotate.max_retries": integer(0),
    "ray.write.num_cpus": number(0),  # the datasink's tasks take only CPUs
}
REQUIRED = ("partition_size", "annotators", "ray", "ray.fetch", "ray.annotate", "ray.write")

# One annotator's keys (annotators.base.AnnotatorConfig).
ANNOTATOR_RULES = {
    "name": STRING,
    "weights": STRING_OR_NULL,
    "device": STRING,
    "dtype": STRING,
    "batch_size": integer(1),
    "options": MAPPING,
}

# The curation steps' options by step (their defaults: the annotator classes' default_options).
CURATION_OPTIONS = {
    "aesthetic": {"head": STRING},
    "outpaint": {
        "margin": number(0.01, 1),  # of each side, added on both sides
        "resolution": integer(8),
        "num_inference_steps": integer(1),
        "guidance_scale": number(0),
        "prompt": STRING_OR_NULL,
        "negative_prompt": STRING_OR_NULL,
        "seed": integer(0),
    },
}
REQUIRED_OPTIONS = {"aesthetic": {"head": "the MLP head's file, e.g. /weights/sac+logos+ava1-l14-linearMSE.pth"}}


# Every key the job reads, for check_known_keys (a typo in a hand-written config fails at start).
ANNOTATE_KEYS = {
    "partition_size": None,
    "source": dict.fromkeys(["url_column", "caption_column", "storage_options", "max_caption_bytes"]),
    "fetch": dict.fromkeys(DEFAULT_FETCH),
    "filters": dict.fromkeys([*DEFAULT_FILTERS, *OPTIONAL_FILTERS]),
    "annotators": None,  # modality → annotator, checked by _check_annotators
    "writer": dict.fromkeys(["storage_options", "max_samples", "max_bytes", "jpeg_quality"]),
    "ray": {
        "fetch": dict.fromkeys(RESOURCES),
        "annotate": dict.fromkeys([*RESOURCES, "actors", "batch_size", "max_retries"]),
        "write": {"num_cpus": None},
    },
}


_MISSING = object()


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _check(key: str, value, rule: Rule) -> None:
    if not rule.accepts(value):
        raise ConfigError(f"{key} must be {rule.expected}, got {value!r} ({type(value).__name__})")


def check_annotate_settings(config: dict) -> None:
    """The whole annotate job config, before anything runs: known keys, required sections, the
    type and range of every value. Raises ConfigError naming the dotted key and the bad value."""
    if not isinstance(config, dict):
        raise ConfigError(f"the annotate config must be a mapping, got {type(config).__name__} (see {REFERENCE})")
    check_known_keys(config, ANNOTATE_KEYS, REFERENCE)
    for key, rule in RULES.items():
        value = _lookup(config, key)
        if value is _MISSING:
            if key in REQUIRED:
                raise ConfigError(f"job config lacks {key!r}; see {REFERENCE}")
            continue
        _check(key, value, rule)
    filters = {**DEFAULT_FILTERS, **config.get("filters", {})}
    if filters["max_people"] < filters["min_people"]:
        raise ConfigError(
            f"filters.max_people must be an integer ≥ filters.min_people ({filters['min_people']}), "
            f"got {filters['max_people']!r} ({type(filters['max_people']).__name__})"
        )
    check_fetch(config.get("fetch"))
    _check_annotators(config["annotators"])
    _check_curation(config["annotators"], config.get("filters", {}))


def _check_annotators(annotators: dict) -> None:
    """Every required modality has an annotator, each a mapping of known keys naming a registered
    annotator (the registry may grow at run time, so it is read here, not at import)."""
    from annotators.registry import REGISTRY
    from pipelines.annotate import MODALITIES, STAGES

    missing = [modality for modality in MODALITIES if modality not in annotators]
    unknown = set(annotators) - {modality for modality, _ in STAGES}
    if missing or unknown:
        raise ConfigError(f"annotators: missing modalities {missing}, unknown {sorted(unknown)}")
    for modality, annotator in annotators.items():
        where = f"annotators.{modality}"
        _check(where, annotator, MAPPING)
        check_known_keys(annotator, dict.fromkeys(ANNOTATOR_RULES), REFERENCE, f"{where}.")
        if "name" not in annotator:
            raise ConfigError(f"{where} lacks 'name': the annotator to run, one of {sorted(REGISTRY)}")
        for key, rule in ANNOTATOR_RULES.items():
            if key in annotator:
                _check(f"{where}.{key}", annotator[key], rule)
        if annotator["name"] not in REGISTRY:
            raise ConfigError(f"{where}.name {annotator['name']!r} is not one of {sorted(REGISTRY)}")


def _check_curation(annotators: dict, filters: dict) -> None:
    """Each curation step configured names an annotator of its kind, with known options of the
    right type; a filter that reads a step's output has that step."""
    import importlib

    from annotators.registry import REGISTRY

    for step, rules in CURATION_OPTIONS.items():
        if step not in annotators:
            continue
        where, name = f"annotators.{step}", annotators[step]["name"]
        module, _, class_name = REGISTRY[name].partition(":")
        annotator = getattr(importlib.import_module(module), class_name)
        if annotator.modality != step:
            raise ConfigError(
                f"{where}.name {name!r} is an annotator of kind {annotator.modality!r}; {where} takes kind "
                f"{step!r} (see {CURATION_REFERENCE})"
            )
        options = annotators[step].get("options", {})
        check_known_keys(options, dict.fromkeys(annotator.default_options), CURATION_REFERENCE, f"{where}.options.")
        for key, what in REQUIRED_OPTIONS.get(step, {}).items():
            if options.get(key) is None:
                raise ConfigError(f"{where}.options lacks {key!r}: {what} (see {CURATION_REFERENCE})")
        for key, rule in rules.items():
            if key in options:
                _check(f"{where}.options.{key}", options[key], rule)
    for rule, step in OPTIONAL_FILTERS.items():
        if rule in filters and step not in annotators:
            raise ConfigError(
                f"filters.{rule} reads the score of annotators.{step}, which is not configured: add "
                f"annotators.{step} (see {CURATION_REFERENCE}) or remove filters.{rule}"
            )


def check_output(output: str, storage_options: dict | None) -> None:
    """``output`` (any fsspec URL) is a folder, or can be made one, and we can write files in it:
    found now, not after an hour of annotating. Creates the folder; leaves nothing else behind."""
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    _make_folder(fs, root, output)
    _probe_write(fs, root, output)


def _is_a_file(output: str) -> ConfigError:
    return ConfigError(f"output {output} is a file, not a folder; pass a folder path")


def _make_folder(fs, root: str, output: str) -> None:
    if fs.isfile(root):
        raise _is_a_file(output)
    try:
        fs.makedirs(root, exist_ok=True)
    except FileExistsError as exc:  # appeared since isfile, or a filesystem that reports it only here
        raise _is_a_file(output) from exc
    except NotADirectoryError as exc:
        raise ConfigError(
            f"output {output} cannot be created: {_file_above(fs, root) or 'a part of its path'} is a file, "
            "not a folder; pass a folder path"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"output {output} cannot be created ({_reason(exc)}); pick another folder or fix the permissions "
            "of its parent"
        ) from exc


def _probe_write(fs, root: str, output: str) -> None:
    # A unique name, so two jobs starting on one output never remove each other's probe.
    probe = posixpath.join(root.rstrip("/"), f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        try:
            with fs.open(probe, "wb") as handle:
                handle.write(b"")
        finally:  # also after a failed write that left the file
            if fs.exists(probe):
                fs.rm(probe)
    except OSError as exc:
        raise ConfigError(
            f"output {output} is not writable ({_reason(exc)}); pick another folder or fix its permissions"
        ) from exc


def _file_above(fs, root: str) -> str:
    """The first parent of ``root`` that is a file ("" when none is)."""
    path = root.rstrip("/")
    while (parent := posixpath.dirname(path)) != path:
        if fs.isfile(parent):
            return parent
        path = parent
    return ""


def _reason(exc: OSError) -> str:
    return exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
