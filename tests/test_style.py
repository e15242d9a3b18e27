import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

SOURCES = [
    "shards",
    "annotators",
    "pipelines",
    "hyperhuman",
    "distill",
    "tests",
    "bench",
    "scripts",
    "configs",
    "setup.py",
]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is a dev dependency; run make setup"
    result = subprocess.run([ruff, *command, *SOURCES], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
