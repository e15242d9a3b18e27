"""The configs ship inside the distribution: a wheel installed elsewhere (not editable) finds every
config through ``importlib.resources``, none from the source tree."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from hyperhuman.config import CONFIG_DIR, available_configs, config_path, load_config

from .conftest import REPO_ROOT

# What a checkout holds that is not source: left out of the copy the wheel is built from.
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
NOT_SOURCE += ("demo_output", "results")

# Runs with only the installed wheel on sys.path (and site-packages for pyyaml): no editable finder.
LOAD_FROM_INSTALL = """
import json, sys
sys.path[:0] = [sys.argv[1]]
sys.path.append(sys.argv[2])
import hyperhuman, hyperhuman.config as config
loaded = {name: sorted(config.load_config(name)) for name in config.available_configs()}
print(json.dumps({"package": hyperhuman.__file__, "config_dir": str(config.CONFIG_DIR),
                  "demo": str(config.config_path("demo")), "loaded": loaded}))
"""


def test_available_configs_name_every_file_in_configs():
    names = available_configs()
    on_disk = sorted(
        p.relative_to(REPO_ROOT / "configs").with_suffix("").as_posix() for p in (REPO_ROOT / "configs").rglob("*.yaml")
    )
    assert names == on_disk and "lsdm/tiny" in names and "demo" in names
    assert CONFIG_DIR.samefile(REPO_ROOT / "configs") and config_path("lsdm/tiny").is_file()
    for name in names:
        assert isinstance(load_config(name), dict), name


def test_wheel_ships_every_config(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    offline = ["--no-deps", "--no-index"]
    subprocess.run(
        [*pip, "wheel", str(source), *offline, "--no-build-isolation", "-w", str(tmp_path / "dist")], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("hyperhuman-*.whl")
    target = tmp_path / "installed"
    subprocess.run([*pip, "install", *offline, "--target", str(target), str(wheel)], check=True)

    site_packages = sysconfig.get_paths()["purelib"]
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD_FROM_INSTALL, str(target), site_packages],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["package"]).is_relative_to(target), found["package"]
    assert Path(found["config_dir"]) == target / "hyperhuman" / "configs"
    assert Path(found["demo"]).is_file() and Path(found["demo"]).is_relative_to(target)
    assert sorted(found["loaded"]) == available_configs()
    for name, keys in found["loaded"].items():
        assert keys == sorted(load_config(name)), name
