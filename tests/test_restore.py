"""A run reads its data where it was trained, from whatever folder a later command runs in."""

from __future__ import annotations

from pathlib import Path

import yaml
from tiny import error_line, run_cli, tiny_overrides, train_tiny, write_folder

from paws.rundir import checkpoint_config, resume_config


def _relative_run(tmp_path: Path, monkeypatch) -> Path:
    """A tiny run trained in ``tmp_path/a`` on the folders ``labeled`` and ``test`` given
    relative to it; ``tmp_path/b`` holds other folders of the same names (other classes)."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_folder(a / "labeled", 3, 4, seed=1)
    write_folder(a / "test", 3, 3, seed=2)
    write_folder(b / "labeled", [3, 4], 4, seed=3, names=["xfive", "xsix"])
    write_folder(b / "test", [3, 4], 3, seed=4, names=["xfive", "xsix"])
    monkeypatch.chdir(a)
    run = train_tiny(tmp_path / "run", tiny_overrides({"labeled": Path("labeled")}))
    monkeypatch.chdir(b)
    return run


def test_a_run_records_its_data_paths_absolute(tmp_path, monkeypatch):
    run = _relative_run(tmp_path, monkeypatch)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["labeled"] == str(tmp_path / "a" / "labeled")
    # Read from another folder, the run still means its own data.
    assert checkpoint_config(run).data.labeled == str(tmp_path / "a" / "labeled")
    assert resume_config(run).data.labeled == str(tmp_path / "a" / "labeled")


def test_predict_from_another_folder_uses_the_runs_classes(tmp_path, monkeypatch, capsys):
    run = _relative_run(tmp_path, monkeypatch)
    image = next((tmp_path / "b" / "test" / "xfive").iterdir())
    code, out, err = run_cli(["predict", str(run), str(image)], capsys, monkeypatch)
    assert code == 0, err
    header, row = out.strip().splitlines()[:2]
    assert header.split(",")[1] == "class_1"
    assert row.split(",")[1] in ("class0", "class1", "class2")


def test_an_override_is_taken_from_the_working_folder(tmp_path, monkeypatch):
    run = _relative_run(tmp_path, monkeypatch)
    cfg = checkpoint_config(run, ["data.test=test"])
    assert cfg.data.test == str(tmp_path / "b" / "test")


def test_a_saved_relative_path_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    run = _relative_run(tmp_path, monkeypatch)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["labeled"] = "labeled"  # as runs recorded it before
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    code, _, err = run_cli(["train", "--resume", str(run)], capsys, monkeypatch)
    assert code == 2
    line = error_line(err)
    assert "data.labeled=labeled" in line and "--set data.labeled=PATH" in line
    assert not (tmp_path / "b" / "labeled" / "metrics.csv").exists()
