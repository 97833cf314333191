"""Labels files as spreadsheets write them: read right, or refused in a line naming the row."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from tiny import tiny_overrides, write_folder

from paws.config import load_config
from paws.data.labels import read_labels_file
from paws.data.sources import load_datasets
from paws.errors import UserError

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
