"""The annotate job's settings are checked at start: every shipped config passes; every bad key or
value is one ConfigError naming the dotted key and the value; the output must be a writable folder."""

import dataclasses
import os

import pytest
import yaml

from annotators.base import AnnotatorConfig
from hyperhuman.config import ConfigError, available_configs, documented_keys, load_config
from pipelines.settings import (
    ANNOTATE_KEYS,
    ANNOTATOR_RULES,
    CURATION_OPTIONS,
    DEFAULT_MAX_CAPTION_BYTES,
    RULES,
    check_annotate_settings,
    check_output,
)

from .curation_models import REGISTRY_ENTRIES, register_curation

ANNOTATE_CONFIGS = [name for name in available_configs() if name.startswith("annotate/")]


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The curation steps' annotators (annotate/full names them), until annotators/registry.py lists them."""
    register_curation(monkeypatch)


@pytest.mark.parametrize("name", ANNOTATE_CONFIGS)
def test_the_shipped_configs_pass(name):
    config = load_config(name)
    check_annotate_settings(config)
    assert config["source"]["max_caption_bytes"] == DEFAULT_MAX_CAPTION_BYTES


def test_the_demos_job_config_passes():
    demo = load_config("demo")
    check_annotate_settings(load_config(demo["job_config"], demo["job_overrides"]))


def test_the_schema_covers_every_rule_and_every_annotator_field():
    keys = documented_keys(ANNOTATE_KEYS)
    known = {".".join(key.split(".")[:depth]) for key in keys for depth in range(1, key.count(".") + 2)}
    assert set(RULES) <= known  # every checked key and section passes check_known_keys
    assert set(ANNOTATOR_RULES) == {field.name for field in dataclasses.fields(AnnotatorConfig)}


def offline_with(override: str) -> dict:
    """configs/annotate/offline.yaml with one ``KEY=VALUE`` set as ``--set`` parses it; a key the
    file leaves to its default (ray.annotate.memory) is added."""
    dotted, _, raw = override.partition("=")
    config = load_config("annotate/offline")
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = yaml.safe_load(raw)
    return config


# (override, text the message must hold besides the key)
BAD_VALUES = [
    ("partition_size=2.5", "must be an integer ≥ 1, got 2.5 (float)"),
    ("partition_size=true", "got True (bool)"),
    ("partition_size=0", "got 0 (int)"),
    ("source=null", "must be a mapping, got None (NoneType)"),
    ("source.url_column=null", "must be a string, got None"),
    ("source.caption_column=5", "must be a string or null, got 5 (int)"),
    ("source.storage_options=[]", "must be a mapping, got [] (list)"),
    ("source.max_caption_bytes=0", "got 0 (int)"),
    ("source.max_caption_bytes=4k", "got '4k' (str)"),
    ("fetch=5", "must be a mapping, got 5 (int)"),
    ("fetch.timeout_s=abc", "'abc'"),
    ("fetch.concurrency=0", "got 0"),
    ("filters=[]", "must be a mapping"),
    ("filters.min_side=abc", "must be an integer ≥ 1, got 'abc' (str)"),
    ("filters.max_aspect=0.5", "must be a number ≥ 1, got 0.5 (float)"),
    ("filters.max_aspect=.nan", "got nan (float)"),
    ("filters.min_people=-1", "must be an integer ≥ 0, got -1 (int)"),
    ("filters.max_people=0", "must be an integer ≥ filters.min_people (1), got 0 (int)"),
    ("filters.min_person_area=1.5", "must be a number in [0, 1], got 1.5 (float)"),
    ("annotators=null", "must be a mapping, got None"),
    ("annotators.pose=mediapipe-pose", "must be a mapping, got 'mediapipe-pose' (str)"),
    ("annotators.pose.name=5", "must be a string, got 5 (int)"),
    ("annotators.pose.name=no-such-annotator", "'no-such-annotator' is not one of"),
    ("annotators.pose.options=null", "must be a mapping, got None"),
    ("annotators.pose.batch_size=0", "got 0 (int)"),
    ("writer=null", "must be a mapping, got None (NoneType)"),
    ("writer.storage_options=null", "must be a mapping, got None"),
    ("writer.max_samples=0", "must be an integer ≥ 1, got 0 (int)"),
    ("writer.max_bytes=1e9", "got '1e9' (str)"),  # YAML 1.1 reads 1e9 (no dot) as a string
    ("writer.jpeg_quality=101", "must be an integer in [1, 100], got 101 (int)"),
    ("ray=null", "must be a mapping"),
    ("ray.fetch=null", "must be a mapping, got None"),
    ("ray.fetch.num_cpus=-1", "must be a number ≥ 0, got -1 (int)"),
    ("ray.annotate.num_cpus=.inf", "got inf (float)"),
    ("ray.annotate.num_gpus=one", "got 'one' (str)"),
    ("ray.annotate.memory=1.5", "must be an integer ≥ 0, got 1.5 (float)"),
    ("ray.annotate.actors=0", "must be an integer ≥ 1, got 0 (int)"),
    ("ray.annotate.batch_size=false", "got False (bool)"),
    ("ray.annotate.max_retries=-1", "must be an integer ≥ 0, got -1 (int)"),
    ("ray.write.num_cpus=null", "must be a number ≥ 0, got None"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_VALUES, ids=[override for override, _ in BAD_VALUES])
def test_a_bad_value_is_one_error_naming_the_key_and_the_value(override, expected):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as error:
        check_annotate_settings(offline_with(override))
    message = str(error.value)
    assert key in message and expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "override",
    ["filters.min_side=abc", "partition_size=2.5", "writer=null", "ray.annotate.actors=0", "source.caption_column=5"],
)
def test_the_same_through_set(override):
    config = load_config("annotate/offline", [override])
    with pytest.raises(ConfigError, match=override.partition("=")[0]):
        check_annotate_settings(config)


def without(dotted: str) -> dict:
    config = load_config("annotate/offline")
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    del node[leaf]
    return config


@pytest.mark.parametrize("key", ["partition_size", "annotators", "ray", "ray.fetch", "ray.annotate", "ray.write"])
def test_a_required_section_that_is_missing_is_named(key):
    with pytest.raises(ConfigError, match=f"job config lacks '{key}'"):
        check_annotate_settings(without(key))


@pytest.mark.parametrize(
    "key", ["source", "fetch", "filters", "writer", "source.max_caption_bytes", "ray.annotate.actors"]
)
def test_optional_keys_take_their_defaults(key):
    check_annotate_settings(without(key))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["writer"].update(max_sample=5), "unknown config key 'writer.max_sample'"),
        (lambda c: c["ray"]["write"].update(num_gpus=1), "unknown config key 'ray.write.num_gpus'"),
        (lambda c: c.update(partition=5), "unknown config key 'partition'"),
        (lambda c: c["fetch"].update(timeout=5), "fetch.timeout"),
        (lambda c: c["annotators"]["pose"].update(weight="x"), "unknown config key 'annotators.pose.weight'"),
        (lambda c: c["annotators"]["pose"].pop("name"), "annotators.pose lacks 'name'"),
        (lambda c: c["annotators"].pop("mask"), "missing modalities ['mask']"),
        (lambda c: c["annotators"].update(hands={"name": "x"}), "unknown ['hands']"),
    ],
)
def test_unknown_and_missing_keys_are_named(edit, expected):
    config = load_config("annotate/offline")
    edit(config)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        check_annotate_settings(config)


# The curation steps: annotators.aesthetic, annotators.outpaint and filters.min_aesthetic, off when absent.


def full_with(override: str) -> dict:
    """configs/annotate/full.yaml with one ``KEY=VALUE`` set as ``--set`` parses it."""
    dotted, _, raw = override.partition("=")
    config = load_config("annotate/full")
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = yaml.safe_load(raw)
    return config


CURATION_BAD_VALUES = [
    ("filters.min_aesthetic=abc", "filters.min_aesthetic must be a number in [0, 10], got 'abc' (str)"),
    ("filters.min_aesthetic=11", "got 11 (int)"),
    ("annotators.aesthetic.options.head=5", "annotators.aesthetic.options.head must be a string, got 5 (int)"),
    ("annotators.aesthetic.options.head=null", "annotators.aesthetic.options lacks 'head': the MLP head's file"),
    ("annotators.aesthetic.options.heads=x", "unknown config key 'annotators.aesthetic.options.heads'"),
    ("annotators.outpaint.options.margin=0", "annotators.outpaint.options.margin must be a number in [0.01, 1], got 0"),
    ("annotators.outpaint.options.margin=1.5", "got 1.5 (float)"),
    ("annotators.outpaint.options.resolution=512.5", "options.resolution must be an integer ≥ 8, got 512.5 (float)"),
    ("annotators.outpaint.options.num_inference_steps=0", "options.num_inference_steps must be an integer ≥ 1, got 0"),
    ("annotators.outpaint.options.guidance_scale=-1", "options.guidance_scale must be a number ≥ 0, got -1 (int)"),
    ("annotators.outpaint.options.prompt=5", "options.prompt must be a string or null, got 5 (int)"),
    ("annotators.outpaint.options.seed=-1", "options.seed must be an integer ≥ 0, got -1 (int)"),
    ("annotators.outpaint.options.margins=0.2", "unknown config key 'annotators.outpaint.options.margins'"),
    (
        "annotators.outpaint.name=laion-aesthetic",
        "annotators.outpaint.name 'laion-aesthetic' is an annotator of kind 'aesthetic'; annotators.outpaint takes "
        "kind 'outpaint' (see configs/annotate/full.yaml)",
    ),
]


@pytest.mark.parametrize(
    ("override", "expected"), CURATION_BAD_VALUES, ids=[override for override, _ in CURATION_BAD_VALUES]
)
def test_a_bad_curation_setting_is_one_error_naming_it(override, expected):
    with pytest.raises(ConfigError) as error:
        check_annotate_settings(full_with(override))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_curation_steps_are_off_in_the_offline_config_and_on_in_full():
    offline, full = load_config("annotate/offline"), load_config("annotate/full")
    assert not {"aesthetic", "outpaint"} & set(offline["annotators"]) and "min_aesthetic" not in offline["filters"]
    assert {"aesthetic", "outpaint"} <= set(full["annotators"]) and full["filters"]["min_aesthetic"] == 4.5
    assert {full["annotators"][step]["name"] for step in ("aesthetic", "outpaint")} == set(REGISTRY_ENTRIES)
    check_annotate_settings(full)


def test_the_aesthetic_filter_needs_the_scorer():
    with pytest.raises(ConfigError) as error:
        check_annotate_settings(offline_with("filters.min_aesthetic=4.5"))
    assert str(error.value) == (
        "filters.min_aesthetic reads the score of annotators.aesthetic, which is not configured: add "
        "annotators.aesthetic (see configs/annotate/full.yaml) or remove filters.min_aesthetic"
    )
    config = load_config("annotate/full")
    del config["filters"]["min_aesthetic"]
    check_annotate_settings(config)  # a scorer alone records the score and rejects nothing


@pytest.mark.parametrize("name", sorted(REGISTRY_ENTRIES))
def test_every_option_of_a_curation_step_has_a_rule(name):
    import importlib

    module, _, class_name = REGISTRY_ENTRIES[name].partition(":")
    annotator = getattr(importlib.import_module(module), class_name)
    assert set(CURATION_OPTIONS[annotator.modality]) == set(annotator.default_options)


# The output folder.


def test_a_new_output_is_created_and_left_empty(tmp_path):
    output = tmp_path / "a" / "b"
    check_output(str(output), {})
    assert output.is_dir() and list(output.iterdir()) == []


def test_an_existing_output_keeps_its_files_and_gets_no_new_ones(tmp_path):
    (tmp_path / "job.json").write_text("{}")
    check_output(str(tmp_path), {})
    assert [path.name for path in tmp_path.iterdir()] == ["job.json"]


def test_an_output_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError) as error:
        check_output(str(path), {})
    assert str(error.value) == f"output {path} is a file, not a folder; pass a folder path"
    assert path.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_an_output_below_a_file_cannot_be_created(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError) as error:
        check_output(str(path / "shards" / "x"), {})
    message = str(error.value)
    assert message.startswith(f"output {path / 'shards' / 'x'} cannot be created: {path} is a file")
    assert "\n" not in message and path.read_text() == "keep me"


needs_permissions = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions"
)


@needs_permissions
def test_a_read_only_output_is_refused_and_left_empty(tmp_path):
    output = tmp_path / "ro"
    output.mkdir()
    output.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as error:
            check_output(str(output), {})
        assert str(error.value) == (
            f"output {output} is not writable (Permission denied); pick another folder or fix its permissions"
        )
        assert list(output.iterdir()) == []
    finally:
        output.chmod(0o700)


@needs_permissions
def test_an_output_in_a_read_only_folder_cannot_be_created(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"cannot be created \(Permission denied\); pick another folder"):
            check_output(str(parent / "out"), {})
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


def test_a_refused_write_is_one_line_even_as_root(tmp_path, monkeypatch):
    """The message of the permission check, whoever runs the tests: the filesystem refuses the write."""
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self, path, mode="rb", **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(LocalFileSystem, "_open", refuse)
    with pytest.raises(ConfigError) as error:
        check_output(str(tmp_path), {})
    assert str(error.value) == (
        f"output {tmp_path} is not writable (Permission denied); pick another folder or fix its permissions"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_refused_folder_is_one_line_even_as_root(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self, path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(LocalFileSystem, "makedirs", refuse)
    with pytest.raises(ConfigError) as error:
        check_output(str(tmp_path / "out"), {})
    assert str(error.value) == (
        f"output {tmp_path / 'out'} cannot be created (Permission denied); pick another folder or fix the "
        "permissions of its parent"
    )
    assert list(tmp_path.iterdir()) == []
