"""``make demo`` then ``make demo DATA=dir``: the second run notices the other photos and redoes
every stage after them; a rerun with the same photos resumes every stage."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from hyperhuman.demo import StageState, digest, packaged_photos, photos_digest

from .conftest import REPO_ROOT
from .test_cli import DEMO_AT_TOY_SIZE


def test_photos_digest_changes_with_any_photo_or_caption(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a black square\n")
    first = photos_digest(tmp_path)
    assert photos_digest(tmp_path) == first
    (tmp_path / "a.txt").write_text("a dark square\n")
    assert photos_digest(tmp_path) != first
    (tmp_path / "a.txt").write_text("a black square\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    assert photos_digest(tmp_path) != first


def test_stage_state_keeps_a_stage_with_the_same_inputs_and_clears_one_with_others(tmp_path, capsys):
    shards, vae = tmp_path / "shards", tmp_path / "vae"
    state = StageState(tmp_path)
    state.enter("annotate", digest("photos A"), [shards])
    state.enter("vae", digest(digest("photos A"), {"steps": 4}), [vae])
    for folder in (shards, vae):
        folder.mkdir()
        (folder / "made").write_text("by the first run")

    again = StageState(tmp_path)  # a rerun: same inputs, everything stays (and resumes)
    again.enter("annotate", digest("photos A"), [shards])
    again.enter("vae", digest(digest("photos A"), {"steps": 4}), [vae])
    assert (shards / "made").is_file() and (vae / "made").is_file()
    assert "clearing" not in capsys.readouterr().out

    other = StageState(tmp_path)  # other photos: the stage and the one built on it are cleared
    other.enter("annotate", digest("photos B"), [shards])
    other.enter("vae", digest(digest("photos B"), {"steps": 4}), [vae])
    assert not shards.exists() and not vae.exists()
    out = capsys.readouterr().out
    assert "[demo] annotate: made from other inputs than this run's" in out and f"clearing {vae}" in out
    assert json.loads((tmp_path / "demo_state.json").read_text())["annotate"] == digest("photos B")

    vae.mkdir()  # same inputs, but the stage before it was retrained in this run: cleared too
    StageState(tmp_path).enter("vae", digest(digest("photos B"), {"steps": 4}), [vae], redo=True)
    assert not vae.exists()


def test_demo_with_data_that_is_not_a_folder_fails_before_clearing_anything(tmp_path):
    from hyperhuman.config import load_config
    from hyperhuman.demo import run_demo

    (tmp_path / "out" / "shards").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--data .*nowhere: no such folder"):
        run_demo(load_config("demo"), str(tmp_path / "out"), data=str(tmp_path / "nowhere"))
    assert (tmp_path / "out" / "shards").is_dir()


@pytest.mark.slow
def test_demo_then_demo_with_other_photos_redoes_the_stages_after_them(tmp_path):
    output, photos = tmp_path / "demo_output", tmp_path / "my_photos"
    photos.mkdir()
    Image.fromarray(packaged_photos()["astronaut"][:, ::-1]).save(photos / "mirrored.png")
    (photos / "mirrored.txt").write_text("an astronaut in an orange suit, mirrored\n")
    command = [str(REPO_ROOT / ".venv" / "bin" / "hyperhuman"), "demo", "--output", str(output), *DEMO_AT_TOY_SIZE]

    def demo(*extra):
        result = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    demo()  # the packaged photos: two samples
    assert json.loads((output / "shards" / "manifest.json").read_text())["samples"] == 2

    out = demo("--data", str(photos))  # make demo DATA=my_photos
    for stage in ("annotate", "vae", "lsdm", "eval"):
        assert f"[demo] {stage}: made from other inputs than this run's" in out, stage
    assert "already trained" not in out
    assert json.loads((output / "shards" / "manifest.json").read_text())["samples"] == 1
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert metrics["info"]["samples"] == 1
    assert len(list((output / "eval" / "samples").iterdir())) == 1  # the old photos' generations are gone

    rerun = demo("--data", str(photos))  # the same photos again: every stage resumes
    assert "made from other inputs" not in rerun
    assert "[demo] vae: already trained" in rerun and "[demo] lsdm: already trained" in rerun
    assert json.loads((output / "eval" / "metrics.json").read_text())["info"]["generated_now"] == 0
