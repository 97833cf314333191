"""``paws train`` (pretrain/train.py) end to end on tiny image folders: train, resume, evaluate;
unreadable images skipped, counted and listed."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tiny import (
    ANIMALS,
    DISK,
    bomb_png,
    paws_train,
    run_paws,
    set_args,
    text_as_jpeg,
    tiny_config,
    tiny_overrides,
    torch_state,
    truncated_jpeg,
    write_config,
    write_folder,
)

from paws import cli
from paws.rundir.checkpoint import load

# Checkpoints and monitoring metrics every 2 of the 4 steps.
EVERY_2 = ["run.checkpoint_every=2", "run.monitor_every=2", "run.threads=1"]


def sets(folders: dict, *changes: str) -> list[str]:
    """``--set`` arguments of a tiny run on the image folders, checkpointed every 2 steps."""
    return set_args(tiny_overrides(folders, *EVERY_2, *changes))


@pytest.mark.slow
def test_train_checkpoint_resume_eval(image_folders, tmp_path):
    run = tmp_path / "run"
    first = run_paws("--quiet", "train", "--out", str(run), *sets(image_folders))
    assert "test accuracy of the chosen model" in first.stdout
    for name in ("config.yaml", "metrics.csv", "last.pt", "final.pt", "tighten.pt", "eval.json"):
        assert (run / name).is_file(), name
    result = json.loads((run / "eval.json").read_text())
    assert result["num_query"] == 12 and result["num_support"] == 12
    assert 0 <= result["top1"] <= result["top5"] <= 100
    # The run ends with Appendix C's tightening: eval.json reports the tightened model and
    # the pre-trained one; tighten.json says the same as `paws tighten` would.
    assert result["model"] == "tighten.pt" and result["tighten"]["steps"] == 3
    tightened = json.loads((run / "tighten.json").read_text())
    assert tightened["paws_nn_before"]["top1"] == result["pretrained"]["top1"]
    assert tightened["paws_nn_after"]["top1"] == result["top1"]
    assert load(run / "tighten.pt")["kind"] == "tighten"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] and r["lr"] and r["images_per_s"] for r in rows)
    assert rows[0]["target_confidence"]  # monitor metrics every 2 steps, from step 0
    assert load(run / "final.pt")["step"] == 4

    # A different length changes the schedule: resuming with it is refused, naming the key.
    refused = run_paws("train", "--resume", str(run), "--set", "optim.steps=6", check=False)
    assert refused.returncode == 2
    assert "optim.steps" in refused.stderr and "Traceback" not in refused.stderr

    evaluated = run_paws("--quiet", "eval", str(run), "--json")  # the run's final model
    again = json.loads(evaluated.stdout)
    assert again["top1"] == result["top1"] and again["num_query"] == 12
    evaluated = run_paws("--quiet", "eval", str(run / "final.pt"), "--json")
    assert json.loads(evaluated.stdout)["top1"] == result["pretrained"]["top1"]


@pytest.mark.slow
def test_tightening_after_training_can_be_switched_off(image_folders, tmp_path):
    run = tmp_path / "run"
    off = sets(image_folders, "tighten.after_training=false", "optim.steps=2")
    out = run_paws("--quiet", "train", "--out", str(run), *off)
    result = json.loads((run / "eval.json").read_text())
    assert result["model"] == "final.pt" and "pretrained" not in result
    assert not (run / "tighten.pt").exists() and "after tightening" not in out.stdout


@pytest.mark.slow
def test_resuming_a_finished_run_only_evaluates_again(image_folders, tmp_path):
    run = tmp_path / "run"
    run_paws("--quiet", "train", "--out", str(run), *sets(image_folders))
    before = load(run / "final.pt")["model"]
    again = run_paws("--quiet", "train", "--resume", str(run))
    assert "test accuracy of the chosen model" in again.stdout
    after = load(run / "final.pt")
    assert after["step"] == 4
    assert all(torch.equal(before[k], after["model"][k]) for k in before)
    started = run_paws("--quiet", "train", "--out", str(run), *sets(image_folders), check=False)
    assert started.returncode == 2 and "--resume" in started.stderr


@pytest.mark.slow
def test_folder_run_with_unlabelled_and_labelled_folders_and_baseline(image_folders, tmp_path):
    run = tmp_path / "run"
    over = sets(image_folders, "data.test=null", "optim.steps=2")
    out = run_paws("--quiet", "train", "--out", str(run), *over)
    assert "run saved" in out.stdout and not (run / "eval.json").exists()  # no test set
    base = run_paws("--quiet", "baseline", "--json", *sets(image_folders, "optim.steps=3"))
    result = json.loads(base.stdout)
    assert result["steps"] == 3 and result["num_labeled"] == 12 and 0 <= result["top1"] <= 100


@pytest.mark.slow
def test_tightening_is_skipped_in_a_line_when_a_class_has_one_labelled_image(
    image_folders, tmp_path
):
    folders = dict(image_folders, labeled=write_folder(tmp_path / "one", per_class=1, size=14))
    over = sets(folders, "support.images_per_class=1", "optim.steps=2")
    out = run_paws("train", "--out", str(tmp_path / "run"), *over)
    assert "not tightening the clusters after training: SuNCEt compares" in out.stderr
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["model"] == "final.pt"


def test_unreadable_images_skipped_in_memory_are_counted(folder, tmp_path, capfd, monkeypatch):
    bad = [truncated_jpeg(folder), text_as_jpeg(folder)]
    cfg = tiny_config(folder, "data.on_bad_image=skip", "optim.steps=2")
    code, out, err = paws_train(tmp_path, capfd, monkeypatch, cfg, quiet=False)
    assert code == 0, err
    listing = tmp_path / "run" / "skipped_images.txt"
    assert f"skipped 2 unreadable images (listed in {listing})" in out
    assert (out + err).count("unreadable images") == 1  # said once
    assert sorted(listing.read_text().split()) == sorted(map(str, bad))
    assert "data: 18 unlabelled, 18 labelled (3 classes)" in err
    assert (tmp_path / "run" / "final.pt").is_file()


@pytest.mark.slow
def test_unreadable_images_skipped_on_disk_are_counted(folder, tmp_path, capfd, monkeypatch):
    # Left out of every set before the data-loader workers start: a labelled image is never
    # read as a blank image of its class.
    bad = [truncated_jpeg(folder), text_as_jpeg(folder)]
    cfg = tiny_config(folder, "data.on_bad_image=skip", "optim.steps=4", *DISK)
    code, out, err = paws_train(tmp_path, capfd, monkeypatch, cfg, quiet=False)
    assert code == 0, err
    listing = tmp_path / "run" / "skipped_images.txt"
    assert f"skipped 2 unreadable images (listed in {listing})" in out
    assert sorted(listing.read_text().split()) == sorted(map(str, bad))
    assert "data: 18 unlabelled, 18 labelled (3 classes)" in err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "final.pt").is_file()


@pytest.mark.slow
def test_skip_on_disk_leaves_bad_labelled_and_test_images_out_and_counts_them(tmp_path, capfd):
    labeled = write_folder(tmp_path / "labeled", names=ANIMALS, channels=3)
    test = write_folder(tmp_path / "test", names=ANIMALS, channels=3, per_class=2, seed=3)
    bad = [bomb_png(labeled / "cat" / "bomb.png"), test / "dog" / "notes.png"]
    bad[1].write_text("not an image\n")
    settings = [
        "data.in_memory=no",
        "data.workers=2",
        "data.on_bad_image=skip",
        "optim.steps=2",
        "tighten.after_training=false",
    ]
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(labeled, f"data.test={test}", *settings))
    run = tmp_path / "run"
    with torch_state():
        code = cli.main(["train", "--config", str(cfg), "--out", str(run)])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "skipped 2 unreadable images" in out
    assert sorted((run / "skipped_images.txt").read_text().split()) == sorted(map(str, bad))
    assert "data: 18 unlabelled, 18 labelled (3 classes), 6 test; on disk" in err
    assert json.loads((run / "eval.json").read_text())["num_query"] == 6
