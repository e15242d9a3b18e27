"""`hyperhuman distill`: the stages are listed, measure prints its JSON, errors are one line."""

import json

from hyperhuman.cli import main


def test_distill_lists_its_stages(capsys):
    try:
        main(["distill", "--help"])
    except SystemExit as done:
        assert done.code == 0
    listed = capsys.readouterr().out
    assert "unet" in listed and "measure" in listed and "evolve" in listed
    assert "steps" in listed and "vae-decoder" in listed


def test_measure_prints_the_quality_measure_as_json(teacher_run, distill_shards, capsys):
    code = main(
        ["distill", "measure", "--model", str(teacher_run), "--reference", str(teacher_run),
         "--shards", str(distill_shards), "--num", "2", "--steps", "1"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num"] == 2 and result["v_loss"] > 0 and result["step_ms"] > 0
    assert set(result["branch_v_loss"]) == {"rgb", "depth", "normal"}
    assert result["psnr"] == {"rgb": 100.0, "depth": 100.0, "normal": 100.0}  # the teacher against itself


def test_a_missing_teacher_is_a_one_line_error(tmp_path, capsys):
    code = main(["distill", "unet", "--set", f"teacher={tmp_path / 'none'}", "--set", f"output={tmp_path / 'run'}"])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("hyperhuman distill: error: ") and "not a run folder with pipeline/" in error
    assert "Traceback" not in error and not (tmp_path / "run").exists()


def test_evolve_writes_the_action_log_and_a_student_spec(teacher_run, distill_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYPERHUMAN_CACHE", str(tmp_path / "cache"))  # a fresh latency table
    code = main(
        ["distill", "evolve", "--model", str(teacher_run), "--shards", str(distill_shards), "--num", "1",
         "--budget", "0.97", "--parts", "branch.*.down_blocks.0.*", "--repeats", "2",
         "--output", str(tmp_path / "evolved")]
    )  # fmt: skip
    assert code == 0
    assert "next: hyperhuman distill unet --set student=" in capsys.readouterr().out
    written = json.loads((tmp_path / "evolved" / "evolve.json").read_text())
    assert written["student"]["remove"] == written["removed"]
    assert all(part.startswith("branch.") and ".down_blocks.0." in part for part in written["candidates"])
    assert len(written["candidates"]) == 12  # 2 ResNets + 2 attentions in each branch's first stage
    # timings are this machine's: the budget is met, or every candidate is out trying
    assert written["budget_met"] == (written["latency_ms"] <= written["budget_ms"])
    assert written["budget_met"] or sorted(written["removed"]) == sorted(written["candidates"])
    assert written["removed"] and written["actions"][0]["action"] == "remove"
