"""Label Studio's formats, as far as image classification needs them: its task JSON, its JSON,
JSON_MIN and CSV exports, and how its tasks name local images.

A task is ``{"data": {"image": URL, ...}, "predictions": [...]}``; an image served by Label
Studio's local-files storage has the URL ``/data/local-files/?d=<path>``, the path relative to
the folder in ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` (URL-encoded). The tasks ``paws
suggest --format labelstudio`` writes also carry :data:`PATH_KEY` in their data: the image as
paws names it (an absolute path, or a dataset's image name), which Label Studio keeps in every
export, so that reading the export back needs no document root. An annotation's class is a
``choices`` result, ``{"from_name": "choice", "to_name": "image", "type": "choices", "value":
{"choices": [CLASS]}}``; the CSV and JSON_MIN exports flatten it into a column named after the
``Choices`` tag (``choice``), beside the task's data columns and Label Studio's own
(:data:`EXPORT_COLUMNS`).

This module reads those exports into ``(number, path, label, suggested)`` records
(:func:`json_records`, :func:`csv_columns`, :func:`choice`, :func:`image_path`);
:mod:`paws.data.labels` turns them into a labels file's rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from paws.errors import UserError, first_line

__all__ = [
    "PATH_KEY",
    "IMAGE_KEY",
    "CHOICE_KEY",
    "LOCAL_FILES",
    "ROOT_VARIABLE",
    "SERVING_VARIABLE",
    "EXPORT_COLUMNS",
    "Record",
    "is_export",
    "csv_columns",
    "json_records",
    "choice",
    "image_path",
]

PATH_KEY = "paws_path"  # task data: the image as paws names it
IMAGE_KEY = "image"  # task data: the image URL (the <Image> tag's value="$image")
CHOICE_KEY = "choice"  # the <Choices> tag's name
LOCAL_FILES = "/data/local-files/?d="
ROOT_VARIABLE = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
SERVING_VARIABLE = "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"
# Columns Label Studio adds to its CSV and JSON_MIN exports, beside the task's data.
EXPORT_COLUMNS = ("id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time")

Record = tuple[int, str, str, str]  # (task number, path, label, suggested label)


def is_export(columns: list[str]) -> bool:
    """Whether a CSV header (or a JSON_MIN record's keys) is a Label Studio export's."""
    return "annotation_id" in columns and "lead_time" in columns


def csv_columns(header: list[str]) -> tuple[str, str]:
    """The path and label columns of a Label Studio CSV export: :data:`PATH_KEY` (else
    :data:`IMAGE_KEY`), and :data:`CHOICE_KEY` (else the one column that is neither the task's
    data nor Label Studio's own).

    Raises:
        UserError: no image column, or no single label column, saying to set
            ``data.labels_columns``.
    """
    path = next((c for c in (PATH_KEY, IMAGE_KEY) if c in header), None)
    if CHOICE_KEY in header:
        label: str | None = CHOICE_KEY
    else:
        rest = [
            c
            for c in header
            if c not in EXPORT_COLUMNS
            and c not in (PATH_KEY, IMAGE_KEY, "agreement")
            and not c.startswith("paws_")
        ]
        label = rest[0] if len(rest) == 1 else None
    if path is None or label is None:
        raise UserError(
            f"a Label Studio export with the columns {', '.join(header)}: name its image and "
            "class columns with data.labels_columns=[IMAGE,CLASS]"
        )
    return path, label


def choice(value: Any, where: str) -> str:
    """The one class of a ``Choices`` value as an export holds it: a word, a list of words, a
    ``{"choices": [...]}`` mapping, or that as JSON text ("" for none).

    Raises:
        UserError: several classes for one image (``where`` names the image).
    """
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("{", "[")):
            return text
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
    if isinstance(value, dict):
        value = value.get("choices", [])
    if isinstance(value, list):
        words = [str(v).strip() for v in value if str(v).strip()]
        if len(words) > 1:
            raise UserError(f"{where} has {len(words)} classes ({', '.join(words)}); give it one")
        return words[0] if words else ""
    return "" if value is None else str(value).strip()


def image_path(ref: str, document_root: str | None = None) -> str:
    """The local file (or image name) a task's image reference means: a local-files URL
    relative to ``document_root`` (default: ``$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``; without
    either, relative to the labels file's folder), any other text as it is.

    Raises:
        UserError: an image uploaded into Label Studio or on the web, which paws cannot read.
    """
    ref = ref.strip()
    if ref.startswith(LOCAL_FILES):
        rel = unquote(ref[len(LOCAL_FILES) :])
        root = document_root or os.environ.get(ROOT_VARIABLE)
        return str(Path(root) / rel) if root else rel
    if ref.startswith(("/data/upload/", "http://", "https://", "s3://", "gs://")):
        raise UserError(
            f"the image '{ref[:80]}' lives in Label Studio or on the web, not in a local file "
            "paws can read: serve your images through Label Studio's local-files storage "
            "(or import paws suggest --format labelstudio tasks)"
        )
    return ref


def json_records(path: Path) -> list[Record]:
    """The images of a Label Studio JSON export (tasks with ``annotations``) or JSON_MIN export
    (flat records), or of a tasks file paws wrote: one record per task, its class from the
    last annotation not cancelled ("" when nobody labelled it), its suggested class from its
    first prediction.

    Raises:
        UserError: a file that is not such JSON, a task without an image.
    """
    try:
        tasks = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read labels file {path} as JSON: {first_line(e)}") from e
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise UserError(f"labels file {path} is JSON but not a list of Label Studio tasks")
    return [_record(n, task, path) for n, task in enumerate(tasks, start=1)]


def _record(n: int, task: dict[str, Any], path: Path) -> Record:
    where = f"labels file {path} task {n}"
    data = task.get("data") if isinstance(task.get("data"), dict) else task  # JSON_MIN: flat
    ref = data.get(PATH_KEY) or data.get(IMAGE_KEY)
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(f"{where} names no image (data.{PATH_KEY} or data.{IMAGE_KEY})")
    name = ref if data.get(PATH_KEY) else image_path(ref)
    if data is task:  # JSON_MIN: the class under the Choices tag's name
        return n, name, choice(task.get(CHOICE_KEY), where), ""
    done = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    label = _result_choice(done[-1], where) if done else ""
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    suggested = _result_choice(predictions[0], where) if predictions else ""
    return n, name, label, suggested


def _result_choice(item: dict[str, Any], where: str) -> str:
    """The class of an annotation's or prediction's ``choices`` result ("" for none)."""
    for r in item.get("result") or []:
        if isinstance(r, dict) and r.get("type") == "choices":
            return choice(r.get("value"), where)
    return ""
