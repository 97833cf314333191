"""Labels as a CSV (``data.labels_file``, data/labels.py): beside class folders or a built-in
dataset, suggestions left unlabelled, uneven label counts, and bad files in one line."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch
from tiny import (
    error_line,
    run_cli,
    set_args,
    tiny_overrides,
    train_tiny,
    write_fashion,
    write_folder,
    write_rows,
)

from paws.config import load_config
from paws.data import load_datasets
from paws.data.labels import read_labels_file
from paws.errors import UserError


def labels_config(pool: dict[str, Path], labels: Path, *changes: str):
    folders = {k: pool[k] for k in ("unlabeled", "test")}
    return load_config(None, [*tiny_overrides(folders), f"data.labels_file={labels}", *changes])


def test_labels_file_alongside_class_folders_with_a_new_class(pool, tmp_path):
    unl = pool["unlabeled"]
    labels = write_rows(
        tmp_path / "labels.csv",
        ["path", "label", "note"],
        [
            [str(unl / "class0" / "class0_5.png"), "class0", "x"],
            ["unl/class2/class2_1.png", "zebra", ""],
        ],
    )
    cfg = load_config(
        None,
        [*tiny_overrides(pool), f"data.labels_file={labels}"],
    )
    data = load_datasets(cfg)
    assert data.classes == ["class0", "class1", "class2", "zebra"]
    assert len(data.labeled) == 9 + 2
    named = dict(zip(data.labeled.names, data.labeled.labels))
    assert data.classes[named[str(unl / "class0" / "class0_5.png")]] == "class0"
    assert data.classes[named["unl/class2/class2_1.png"]] == "zebra"
    assert data.classes[named["class1/class1_0.png"]] == "class1"  # the folder's own


def test_unlabelled_suggestions_are_skipped_unless_accepted(pool, tmp_path):
    header = ["path", "label", "suggested_label", "confidence", "reason"]
    rows = [
        ["unl/class0/class0_0.png", "class0", "class0", "0.9", "coverage"],
        ["unl/class1/class1_0.png", "", "class1", "0.6", "uncertain (margin 0.10)"],
        ["unl/class2/class2_0.png", "class2", "class1", "0.5", "uncertain (margin 0.02)"],
    ]
    labels = write_rows(tmp_path / "next.csv", header, rows)
    skipped = load_datasets(labels_config(pool, labels))
    assert sorted(skipped.labeled.names) == ["unl/class0/class0_0.png", "unl/class2/class2_0.png"]
    accepted = load_datasets(labels_config(pool, labels, "data.accept_suggested=true"))
    assert len(accepted.labeled) == 3
    named = dict(zip(accepted.labeled.names, accepted.labeled.labels))
    assert accepted.classes[named["unl/class1/class1_0.png"]] == "class1"
    assert accepted.classes[named["unl/class2/class2_0.png"]] == "class2"  # the person's label


def test_labels_file_of_a_built_in_dataset_names_training_images(tmp_path):
    write_fashion(tmp_path / "fm")
    labels = write_rows(
        tmp_path / "labels.csv", ["path", "label"], [["7", "Sneaker"], ["3", "Dress"], ["12", "8"]]
    )
    cfg = load_config(None, [f"data.root={tmp_path / 'fm'}", f"data.labels_file={labels}"])
    data = load_datasets(cfg)
    assert data.labeled.names == ["3", "7", "12"]
    assert [data.classes[y] for y in data.labeled.labels] == ["Dress", "Sneaker", "Bag"]
    assert len(data.unlabeled) == 60  # the labelled images stay in the unlabelled set
    torch.testing.assert_close(data.labeled.images[1], data.unlabeled.images[7])


TINY_TRAIN = ["optim.steps=1", "run.device=cpu", "data.workers=0"]


def bad_file(pool: dict[str, Path], tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A labels file with one thing wrong, and the extra settings of its run."""
    header = ["path", "label"]
    good = ["unl/class0/class0_0.png", "class0"]
    rows = {
        "unknown path": [good, ["unl/class0/nope.png", "class0"]],
        "empty label": [good, ["unl/class1/class1_0.png", ""]],
        "duplicate": [
            good,
            ["unl/class1/class1_0.png", "class1"],
            ["./unl/class0/class0_0.png", "class0"],
        ],
        "conflict": [good, ["unl/class0/class0_0.png", "class1"]],
        "conflict with a class folder": [["lab/class1/class1_2.png", "class0"]],
        "unknown class": [["5", "Sneakers"]],
        "unknown image name": [["60", "Bag"]],
    }[case]
    labels = write_rows(tmp_path / "labels.csv", header, rows)
    if case.startswith("unknown class") or case == "unknown image name":
        write_fashion(tmp_path / "fm")
        return labels, [f"data.root={tmp_path / 'fm'}", f"data.labels_file={labels}", *TINY_TRAIN]
    folders = pool if case == "conflict with a class folder" else {"unlabeled": pool["unlabeled"]}
    return labels, [*tiny_overrides(folders), f"data.labels_file={labels}"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown path", "row 3 ('unl/class0/nope.png'): no such image file"),
        ("empty label", "row 3 ('unl/class1/class1_0.png'): the label is empty; fill it in"),
        (
            "duplicate",
            "row 4 ('./unl/class0/class0_0.png'): duplicate: row 2 labels the same image",
        ),
        (
            "conflict",
            "row 3 ('unl/class0/class0_0.png'): conflicting labels: 'class1' here, 'class0' on "
            "row 2 for the same image",
        ),
        (
            "conflict with a class folder",
            "row 2 ('lab/class1/class1_2.png'): conflicting labels: 'class0' here, 'class1' by "
            "its class folder",
        ),
        ("unknown class", "row 2 ('5'): 'Sneakers' is not a class of the dataset (T-shirt/top"),
        ("unknown image name", "row 2 ('60'): no image of that name in the training set"),
    ],
)
def test_a_bad_labels_file_is_one_line_naming_the_row(
    case, message, pool, tmp_path, capsys, monkeypatch
):
    labels, overrides = bad_file(pool, tmp_path, case)
    argv = ["--quiet", "train", "--out", str(tmp_path / "run"), *set_args(overrides)]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"labels file {labels} "), line
    assert message in line, line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_labels_file_with_classes_of_one_two_and_twenty_labels_trains(tmp_path):
    unl = write_folder(tmp_path / "unl", 4, 20, seed=5)
    counts = {0: 1, 1: 2, 2: 20, 3: 20}
    rows = [
        [f"unl/class{c}/class{c}_{i}.png", f"class{c}"] for c, n in counts.items() for i in range(n)
    ]
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    test = write_folder(tmp_path / "test", 4, 2, seed=6)
    overrides = [
        *tiny_overrides({"unlabeled": unl, "test": test}),
        f"data.labels_file={labels}",
        "support.classes=null",
        "support.images_per_class=5",
    ]
    run = train_tiny(tmp_path / "run", overrides)
    assert json.loads((run / "eval.json").read_text())["num_support"] == 43
    assert (run / "tighten.pt").is_file()
    assert load_config(run / "config.yaml").support.classes == 4


def test_unlabelled_rows_only_is_one_line(pool, tmp_path, capsys, monkeypatch):
    labels = write_rows(
        tmp_path / "next.csv",
        ["path", "label", "suggested_label", "confidence", "reason"],
        [["unl/class0/class0_0.png", "", "class0", "0.5", "coverage"]],
    )
    overrides = [*tiny_overrides({"unlabeled": pool["unlabeled"]}), f"data.labels_file={labels}"]
    argv = ["--quiet", "train", "--out", str(tmp_path / "run"), *set_args(overrides)]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    assert "labels no image (1 suggestions are still unlabelled)" in error_line(err)


ZERO = unicodedata.normalize("NFC", "zéro")


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """A labelled folder of classes 'zéro' (NFC) and 'one', and an unlabelled one."""
    return {
        "labeled": write_folder(tmp_path / "lab", 2, 3, seed=1, names=[ZERO, "one"]),
        "unlabeled": write_folder(tmp_path / "unl", 2, 4, seed=2, names=["u0", "u1"]),
    }


def _load(folders: dict[str, Path], csv: Path):
    return load_datasets(load_config(None, [*tiny_overrides(folders), f"data.labels_file={csv}"]))


def _write(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "labels.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_a_decomposed_label_is_the_same_class_as_the_composed_folder(folders, tmp_path):
    nfd = unicodedata.normalize("NFD", ZERO)
    assert nfd != ZERO
    data = _load(folders, _write(tmp_path, f"path,label\nunl/u0/u0_1.png,{nfd}\n"))
    assert data.classes == sorted([ZERO, "one"])
    assert data.classes[data.labeled.labels[-1]] == ZERO


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('path,label\nunl/u0/u0_0.png,"one\nunl/u0/u0_1.png,one\n', "row 2: unexpected end"),
        (
            'path,label\nunl/u0/u0_0.png,"one\nunl/u0/u0_1.png,one"\nunl/u1/u1_0.png,one\n',
            "row 2 ('unl/u0/u0_0.png'): the label holds a line break",
        ),
        ("path,label\nunl/u0/u0_0.png,on\x00e\n", "control character '\\x00'"),
        ("path,label\nunl/u0/u0_0.png,0\n", "the label '0' is a number, but"),
        (
            "path,label\nunl/u0/u0_0.png,two\nunl/u0/u0_1.png,2\n",
            "row 3 ('unl/u0/u0_1.png'): the label '2' is a number, but",
        ),
        ("path,label\nunl/u0/u0_0.png," + "x" * 200_000 + "\n", "row 2: field larger"),
    ],
    ids=["open quote", "quote closed later", "NUL", "number", "number and name", "huge field"],
)
def test_a_misread_labels_file_is_one_line_naming_the_row(folders, tmp_path, text, message):
    csv = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        _load(folders, csv)
    line = str(e.value)
    assert line.startswith(f"labels file {csv} ") and message in line, line
    assert "\n" not in line


def test_excel_unicode_text_is_read_and_latin_1_refused(folders, tmp_path):
    text = f"path\tlabel\nunl/u0/u0_0.png\t{ZERO}\n"
    rows = read_labels_file(_write(tmp_path, text, "utf-16")).rows
    assert [(r.path, r.label) for r in rows] == [("unl/u0/u0_0.png", ZERO)]
    latin = _write(tmp_path, f"path,label\nunl/u0/u0_0.png,{ZERO}\n", "latin-1")
    with pytest.raises(UserError, match="is not UTF-8 text .*save it as CSV UTF-8"):
        read_labels_file(latin)


def test_classes_that_differ_only_in_case_are_kept_with_a_warning(folders, tmp_path, capsys):
    data = _load(folders, _write(tmp_path, "path,label\nunl/u0/u0_0.png,One\n"))
    assert "One" in data.classes and "one" in data.classes
    assert "'One' and 'one' differ only in case" in capsys.readouterr().err


@pytest.mark.parametrize("header", ["path,label,label", "path,path,label", "label,path,label"])
def test_a_column_named_twice_is_refused(header, tmp_path):
    path = _write(tmp_path, f"{header}\nunl/u0/u0_0.png,a,b\n")
    with pytest.raises(UserError, match="has 2 columns named '(path|label)': which one holds"):
        read_labels_file(path)
