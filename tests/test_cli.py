"""The ``paws`` command line (cli/): a mistake in a command ends in one line and exit status 2,
and ``--debug`` shows the traceback instead."""

from __future__ import annotations

import shutil

import pytest
from tiny import (
    error_line,
    tiny_config,
    tiny_overrides,
    write_config,
)

from paws import cli
from paws.after.finetune import finetune_checkpoint
from paws.cli import main
from paws.errors import UserError


def test_user_errors_are_one_line(shared_run, tmp_path, capsys):
    paths, run_dir = shared_run
    finetune_checkpoint(run_dir, ["finetune.lrs=[0.05]", "finetune.epochs=[1]"], tmp_path)
    capsys.readouterr()
    cases = [
        ["predict", str(run_dir), str(tmp_path / "missing.png")],
        ["predict", str(tmp_path / "finetune.pt"), str(paths["test"]), "--support", "x"],
        ["embed", str(run_dir), str(paths["test"]), "--out", str(tmp_path / "e.csv")],
        ["predict", str(tmp_path), str(paths["test"])],
    ]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases.append(["predict", str(run_dir), str(tmp_path / "bad.png")])
    for args in cases:
        assert main(["--quiet", *args]) == 2, args
        error_line(capsys.readouterr().err)


def test_a_file_named_with_a_leading_dash_is_explained_and_read_after_dashes(
    shared_run, tmp_path, capsys, monkeypatch
):
    paths, run_dir = shared_run
    monkeypatch.chdir(tmp_path)
    shutil.copy(next(paths["test"].rglob("*.png")), tmp_path / "-x.png")
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "predict", str(run_dir), "-x.png"])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert line.endswith(
        "(-x.png is read as an option; to name the file, write ./-x.png or put -- before it)"
    )
    for spelt in (["./-x.png"], ["--", "-x.png"]):
        assert main(["--quiet", "predict", str(run_dir), *spelt]) == 0
        assert "-x.png," in capsys.readouterr().out


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="labelled folder not found"):
        cli.main(["--debug", "--quiet", "train", "--config", str(cfg), "--out", str(tmp_path)])


def test_no_output_may_overwrite_an_input_or_land_in_the_data(shared_run, tmp_path, capsys):
    from tiny import error_line

    from paws.cli import main

    paths, run_dir = shared_run
    photo = tmp_path / "photo.png"
    shutil.copy(next((paths["test"] / "class0").iterdir()), photo)
    before = photo.read_bytes()
    cases = [
        (["predict", str(run_dir), str(photo), "--out", str(photo)], "is one of the inputs"),
        (
            ["embed", str(run_dir), str(photo), "--out", str(tmp_path / "photo.npy")],
            None,  # photo.npy and photo.txt are not inputs: allowed
        ),
        (
            ["export", str(run_dir), "--out", str(paths["labeled"] / "class0")],
            "lies inside the data folder",
        ),
        (
            [
                "suggest",
                str(run_dir),
                "-n",
                "2",
                "--out",
                str(tmp_path / "s.csv"),
                "--html",
                str(tmp_path / "s.csv"),
            ],
            "--html",
        ),
    ]
    for argv, message in cases:
        code = main(["--quiet", *argv])
        err = capsys.readouterr().err
        if message is None:
            assert code == 0, err
            continue
        assert code == 2, (argv, err)
        assert message in error_line(err), err
    assert photo.read_bytes() == before
    assert not any(p.suffix == ".json" for p in (paths["labeled"] / "class0").iterdir())
    assert not (tmp_path / "s.csv").exists()


def test_the_python_api_trains_and_suggests_as_the_commands_do(image_folders, tmp_path):
    from tiny import read_rows

    import paws

    overrides = tiny_overrides(image_folders)
    result = paws.train(overrides=overrides, out=tmp_path / "run")
    assert result["status"] == "done" and (tmp_path / "run" / "choice.json").is_file()
    s = paws.suggest(tmp_path / "run", 3, out=tmp_path / "next.csv")
    rows = read_rows(tmp_path / "next.csv")
    assert len(s.picks) == len(rows) == 3 and all(r["label"] == "" for r in rows)
    assert paws.load(tmp_path / "run").classes == ["class0", "class1", "class2"]
