"""Labels as a file: the CSV that ``paws suggest`` writes and ``data.labels_file`` reads.

The file has a header naming at least the columns ``path`` and ``label``; other columns are
allowed and ignored, so the suggestion file ``paws suggest`` writes (:data:`SUGGESTION_COLUMNS`:
``path,label,suggested_label,confidence,reason``) is a labels file once its ``label`` column is
filled in. A path is relative to the CSV's folder, or absolute; for a built-in or Hugging Face
dataset it is an image's name (the training-set index; for Hugging Face, a file path or row
number, ``<split>/<name>`` in the unlabelled split), matched as ``data.split_file`` lines are.

Rows are numbered as a spreadsheet numbers them: the header is row 1. A row whose label is empty
is a suggestion nobody labelled yet when the file has a ``suggested_label`` column: it is
skipped, or with ``accept_suggested`` takes the suggested label. In any other file an empty label
is an error. Unknown paths, duplicates and conflicting labels are errors too, each one line
naming the file, the row and the path (:meth:`LabelsFile.error`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from paws.errors import UserError
from paws.files import write_atomic

__all__ = [
    "LABEL_COLUMNS",
    "SUGGESTION_COLUMNS",
    "LabelRow",
    "LabelsFile",
    "read_labels_file",
    "csv_path",
    "write_suggestions",
]

LABEL_COLUMNS = ("path", "label")
SUGGESTION_COLUMNS = ("path", "label", "suggested_label", "confidence", "reason")


@dataclass(frozen=True)
class LabelRow:
    """One labelled image of a labels file.

    Attributes:
        row: its row in the file (the header is row 1).
        path: the path or image name as written.
        label: the class name (the suggested one when it was accepted).
    """

    row: int
    path: str
    label: str


@dataclass
class LabelsFile:
    """A labels file read and checked row by row (not yet matched to images).

    Attributes:
        path: the file.
        rows: the labelled rows, in file order.
        unlabelled: rows of suggestions left without a label (skipped).
    """

    path: Path
    rows: list[LabelRow]
    unlabelled: int = 0

    def error(self, row: LabelRow, what: str) -> UserError:
        """The one-line error about ``row``: the file, the row number, the path, then what."""
        return UserError(f"labels file {self.path} row {row.row} ('{row.path}'): {what}")

    def file(self, row: LabelRow) -> Path:
        """The image file ``row`` names: relative to the CSV's folder, or absolute."""
        p = Path(row.path).expanduser()
        return p if p.is_absolute() else self.path.parent / p

    def unique(self, key: Callable[[LabelRow], str]) -> dict[str, LabelRow]:
        """The rows by image (``key``: the image a row means, e.g. its resolved path).

        Raises:
            UserError: the same image on two rows, with the same label (a duplicate) or with
                another (a conflict).
        """
        seen: dict[str, LabelRow] = {}
        for r in self.rows:
            k = key(r)
            first = seen.get(k)
            if first is None:
                seen[k] = r
            elif first.label == r.label:
                raise self.error(r, f"duplicate: row {first.row} labels the same image; remove one")
            else:
                raise self.error(
                    r,
                    f"conflicting labels: '{r.label}' here, '{first.label}' on row {first.row} "
                    "for the same image; keep one",
                )
        return seen


def read_labels_file(path: str | Path, accept_suggested: bool = False) -> LabelsFile:
    """Read a labels CSV (see the module's doc).

    Args:
        path: the file.
        accept_suggested: a row with an empty label takes its ``suggested_label``.

    Raises:
        UserError: a missing file, no ``path`` or ``label`` column, an empty path, an empty
            label that is not a suggestion left unlabelled, or no labelled row at all.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"labels file not found: {p}")
    with open(p, newline="", encoding="utf-8-sig") as f:
        table = list(csv.reader(f))
    header = [h.strip() for h in table[0]] if table else []
    missing = [c for c in LABEL_COLUMNS if c not in header]
    if missing:
        raise UserError(
            f"labels file {p} needs a header row with the columns path,label "
            f"(missing: {', '.join(missing)})"
        )
    col = {name: header.index(name) for name in header}
    suggestions = "suggested_label" in col
    out = LabelsFile(p, [])

    def cell(values: list[str], name: str) -> str:
        i = col.get(name)
        return values[i].strip() if i is not None and i < len(values) else ""

    for n, values in enumerate(table[1:], start=2):
        if not any(v.strip() for v in values):
            continue  # a blank line
        row = LabelRow(n, cell(values, "path"), cell(values, "label"))
        if not row.path:
            raise out.error(row, "the path is empty")
        if not row.label and suggestions:
            if not accept_suggested:
                out.unlabelled += 1
                continue
            row = LabelRow(n, row.path, cell(values, "suggested_label"))
        if not row.label:
            hint = " and no suggested label" if suggestions else "; fill it in or remove the row"
            raise out.error(row, f"the label is empty{hint}")
        out.rows.append(row)
    if not out.rows:
        left = f" ({out.unlabelled} suggestions are still unlabelled)" if out.unlabelled else ""
        raise UserError(f"labels file {p} labels no image{left}; fill in the label column")
    return out


def csv_path(file: Path, folder: Path) -> str:
    """How a labels file in ``folder`` names ``file``: relative to ``folder`` where possible,
    else absolute."""
    try:
        return os.path.relpath(file.resolve(), folder.resolve())
    except ValueError:  # another drive (Windows)
        return str(file.resolve())


def write_suggestions(path: str | Path, rows: Sequence[Sequence[object]]) -> Path:
    """Write a suggestion file: the header :data:`SUGGESTION_COLUMNS`, then ``rows`` (each
    ``(path, label, suggested_label, confidence, reason)``, empty cells as ``""``)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(SUGGESTION_COLUMNS)
    w.writerows(rows)
    write_atomic(p, text.getvalue())  # never half a file
    return p
