"""Labels as a file: the CSV that ``paws suggest`` writes and ``data.labels_file`` reads.

The file has a header naming at least the columns ``path`` and ``label``; other columns are
allowed and ignored, so the suggestion file ``paws suggest`` writes (:data:`SUGGESTION_COLUMNS`:
``path,label,suggested_label,confidence,reason``) is a labels file once its ``label`` column is
filled in. A path is relative to the CSV's folder, or absolute; for a built-in or Hugging Face
dataset it is an image's name (the training-set index; for Hugging Face, a file path or row
number, ``<split>/<name>`` in the unlabelled split), matched as ``data.split_file`` lines are.

Label Studio's exports are labels files as they are (:mod:`paws.data.labelstudio`): its JSON
and JSON_MIN exports (a ``.json`` file) and its CSV export (recognised by its ``annotation_id``
and ``lead_time`` columns; the image in ``paws_path`` or ``image``, the class in ``choice``); a
task nobody labelled counts as a suggestion left unlabelled. Any other CSV names its path and
label columns with ``columns`` (``data.labels_columns``).

Rows are numbered as a spreadsheet numbers them: the header is row 1. A row whose label is empty
is a suggestion nobody labelled yet when the file has a ``suggested_label`` column: it is
skipped, or with ``accept_suggested`` takes the suggested label. In any other file an empty label
is an error. Unknown paths, duplicates and conflicting labels are errors too, each one line
naming the file, the row and the path (:meth:`LabelsFile.error`).

What a spreadsheet may do to a file is read or refused, never misread: UTF-8 (with or without
a byte-order mark) and UTF-16 (Excel's "Unicode text", tab-separated) are read; other
encodings, an unbalanced quote (which would swallow the rows after it) and a field with a line
break or a control character (a NUL byte) are refused in a line. Labels are compared in
Unicode's composed form (NFC), as macOS and Windows may write the same name in two forms.
"""

from __future__ import annotations

import csv
import io
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from paws.data import labelstudio
from paws.data.images import class_name
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
    "filled_labels",
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
        unlabelled: rows of suggestions (or Label Studio tasks) left without a label (skipped).
        unit: what the file's records are called in messages: ``row``, or a JSON file's
            ``task``.
    """

    path: Path
    rows: list[LabelRow]
    unlabelled: int = 0
    unit: str = "row"

    def error(self, row: LabelRow, what: str) -> UserError:
        """The one-line error about ``row``: the file, the row (or task) number, the path, then
        what."""
        return UserError(f"labels file {self.path} {self.unit} {row.row} ('{row.path}'): {what}")

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


def read_labels_file(
    path: str | Path, accept_suggested: bool = False, columns: Sequence[str] | None = None
) -> LabelsFile:
    """Read a labels file (see the module's doc): a CSV, or a Label Studio export.

    Args:
        path: the file: ``.json`` is read as Label Studio JSON (:mod:`paws.data.labelstudio`),
            anything else as CSV.
        accept_suggested: a row with an empty label takes its ``suggested_label`` (a Label
            Studio task: its prediction).
        columns: a CSV's path and label columns (``data.labels_columns``); default ``path``
            and ``label``, or a Label Studio export's (:func:`paws.data.labelstudio.csv_columns`).

    Raises:
        UserError: a missing file, no path or label column, an empty path, an empty label
            that is not a suggestion left unlabelled, or no labelled row at all.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"labels file not found: {p}")
    if p.suffix.lower() == ".json":
        return _collected(
            LabelsFile(p, [], unit="task"), labelstudio.json_records(p), True, accept_suggested
        )
    table = _table(p)
    header = [h.strip() for h in table[0]] if table else []
    studio = labelstudio.is_export(header)
    path_col, label_col = _columns(p, header, columns, studio)
    for name in (path_col, label_col):
        if header.count(name) > 1:
            raise UserError(
                f"labels file {p} has {header.count(name)} columns named {name!r}: which one "
                "holds the answer is unclear; keep one (or rename the others)"
            )
    col = {name: header.index(name) for name in header}
    suggestions = "suggested_label" in col or studio

    def cell(values: list[str], name: str) -> str:
        i = col.get(name)
        return values[i].strip() if i is not None and i < len(values) else ""

    out = LabelsFile(p, [])
    records = [
        (n, cell(v, path_col), cell(v, label_col), cell(v, "suggested_label"))
        for n, v in enumerate(table[1:], start=2)
        if any(x.strip() for x in v)  # not a blank line
    ]
    if studio:
        records = [
            (
                n,
                labelstudio.image_path(path) if path_col != labelstudio.PATH_KEY else path,
                labelstudio.choice(label, f"labels file {p} row {n}"),
                hint,
            )
            for n, path, label, hint in records
        ]
    return _collected(out, records, suggestions, accept_suggested)


def _columns(
    p: Path, header: list[str], columns: Sequence[str] | None, studio: bool
) -> tuple[str, str]:
    """The path and label columns of a CSV labels file."""
    if columns:
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(
                f"labels file {p} has no column {', '.join(missing)} (data.labels_columns); "
                f"its columns: {', '.join(header)}"
            )
        return columns[0], columns[1]
    if all(c in header for c in LABEL_COLUMNS):
        return LABEL_COLUMNS
    if studio:
        return labelstudio.csv_columns(header)
    missing = [c for c in LABEL_COLUMNS if c not in header]
    raise UserError(
        f"labels file {p} needs a header row with the columns path,label (missing: "
        f"{', '.join(missing)}), or name its columns with data.labels_columns=[PATH,LABEL]"
    )


def _collected(
    out: LabelsFile, records: list[labelstudio.Record], suggestions: bool, accept: bool
) -> LabelsFile:
    """``out`` with the labelled ``(number, path, label, suggested)`` records as rows: an empty
    path is an error; an empty label skips a suggestion (or takes its suggested label with
    ``accept``) and is an error elsewhere."""
    for n, path, label, suggested in records:
        row = LabelRow(n, path, label)
        if not row.path:
            raise out.error(row, "the path is empty")
        if not row.label and suggestions:
            if not accept or not suggested:  # a group of no labelled class has no suggestion
                out.unlabelled += 1
                continue
            row = LabelRow(n, row.path, suggested)
        if not row.label:
            hint = " and no suggested label" if suggestions else "; fill it in or remove the row"
            raise out.error(row, f"the label is empty{hint}")
        out.rows.append(_checked(out, row))
    if not out.rows:
        left = f" ({out.unlabelled} suggestions are still unlabelled)" if out.unlabelled else ""
        raise UserError(f"labels file {out.path} labels no image{left}; fill in the label column")
    return out


def filled_labels(path: Path) -> int:
    """How many rows of an existing suggestion or labels file have a label filled in (in any
    encoding and separator :func:`read_labels_file` reads): work a new suggestion file must
    not overwrite.

    Raises:
        UserError: a file that cannot be read as such a table, or has no label column: it is
            someone's file, not one paws wrote.
    """
    rows = _table(path)
    header = [h.strip() for h in rows[0]] if rows else []
    if "label" not in header:
        raise UserError(f"{path} has no label column")
    col = header.index("label")
    return sum(1 for r in rows[1:] if col < len(r) and r[col].strip())


def _text(p: Path) -> str:
    """A labels file's text: UTF-8 (a byte-order mark allowed) or UTF-16 with its mark."""
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read labels file {p}: {e.strerror or e}") from e
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"labels file {p} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}, as "
            "Latin-1 or Windows-1252 write it); save it as CSV UTF-8"
        ) from e


def _table(p: Path) -> list[list[str]]:
    """The rows of a labels file, comma- or (Excel's Unicode text) tab-separated.

    Raises:
        UserError: a quote left open or a field too long (the row named).
    """
    text = _text(p)
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    table: list[list[str]] = []
    try:
        for values in reader:
            table.append(values)
    except csv.Error as e:
        where = len(table) + 1
        raise UserError(
            f"labels file {p} row {where}: {e} (a quote left open swallows the rows after "
            "it); fix the quotes of that row"
        ) from e
    return table


def _checked(out: LabelsFile, row: LabelRow) -> LabelRow:
    """``row`` with its label in NFC, refusing line breaks and control characters: they come
    from a quote left open, or from a file that is not text, never from a class name."""
    for what, value in (("path", row.path), ("label", row.label)):
        if value.splitlines() != [value]:
            raise out.error(
                row, f"the {what} holds a line break (a quote left open?); fix the quotes"
            )
        bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise out.error(row, f"the {what} holds the control character {bad!r}; remove it")
    return LabelRow(row.row, row.path, class_name(row.label))


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
