"""``paws suggest --format labelstudio``: the images to label next as Label Studio tasks, with
paws's suggestion as a pre-annotation.

The tasks file is a JSON list in Label Studio's task format: each task's ``data`` holds the
image as a local-files URL (``/data/local-files/?d=<path below the document root>``), the
image as paws names it (``paws_path``: what :mod:`paws.data.labelstudio` reads back from the
export), its rank and the reason it was chosen; ``predictions`` holds the suggested class as a
``choices`` result with PAWS-NN's probability as the score (none at a cold start). Beside it,
a labelling config (``<out>.xml``: an ``<Image name="image">`` and a single-choice
``<Choices name="choice">`` of the run's classes) makes a project that shows them.

Label Studio serves local files only below ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` and with
``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``; the document root is ``document_root``, that
variable, or else the folder above the images' common folder (a storage path must lie below
the root). Images held in memory (a built-in or Hugging Face dataset) are written as PNG files
into ``<out>-images/`` first, so that Label Studio can serve them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from paws.data.labelstudio import (
    CHOICE_KEY,
    IMAGE_KEY,
    LOCAL_FILES,
    PATH_KEY,
    ROOT_VARIABLE,
)
from paws.errors import UserError
from paws.files import write_atomic, write_with
from paws.labelling.records import Pool, Suggestions

__all__ = ["LabelStudioFiles", "tasks", "labeling_config", "write_tasks"]


@dataclass
class LabelStudioFiles:
    """What :func:`write_tasks` wrote and the settings Label Studio needs to show it.

    Attributes:
        tasks: the tasks JSON.
        config: the labelling config XML, or None without classes (a cold start).
        document_root: the folder for ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``.
        storage: the folder to add as a Local files storage (it holds every image).
    """

    tasks: Path
    config: Path | None
    document_root: Path
    storage: Path


def _image_files(s: Suggestions, out: Path) -> list[Path]:
    """Each pick's image file; images in memory are written as PNGs beside ``out``."""
    pool: Pool = s.pool
    if pool.images.files is not None:
        return [pool.images.files[p.index].resolve() for p in s.picks]
    folder = out.parent / f"{out.stem}-images"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for rank, p in enumerate(s.picks, start=1):
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in pool.images.names[p.index])
        file = (folder / f"{rank:05d}-{name}.png").resolve()
        picture = pool.picture(p.index)
        write_with(file, lambda f, im=picture: im.save(f, format="PNG"))
        files.append(file)
    return files


def _root(files: list[Path], document_root: str | Path | None) -> Path:
    """The document root: given, from the environment, or the folder above the images'."""
    given = document_root or os.environ.get(ROOT_VARIABLE)
    if given:
        return Path(given).expanduser().resolve()
    common = Path(os.path.commonpath([str(f.parent) for f in files]))
    return common.parent if common.parent != common else common


def tasks(s: Suggestions, files: list[Path], root: Path) -> list[dict[str, Any]]:
    """The Label Studio tasks of the suggestions, best first (see the module's doc).

    Args:
        s: the suggestions.
        files: each pick's image file (resolved).
        root: the document root the URLs are relative to.

    Raises:
        UserError: an image outside the document root, which Label Studio cannot serve.
    """
    out = []
    for rank, (p, file) in enumerate(zip(s.picks, files), start=1):
        try:
            rel = file.relative_to(root)
        except ValueError as e:
            raise UserError(
                f"{file} is not below the Label Studio document root {root}: set "
                f"--document-root (and {ROOT_VARIABLE}) to a folder that holds the images"
            ) from e
        named = s.pool.images.names[p.index] if s.pool.images.files is None else str(file)
        task: dict[str, Any] = {
            "data": {
                IMAGE_KEY: LOCAL_FILES + quote(rel.as_posix(), safe="/"),
                PATH_KEY: named,
                "paws_rank": rank,
                "paws_reason": p.reason,
            }
        }
        if p.group_size is not None:  # of no labelled class: not one of the config's choices
            task["data"]["paws_group"] = p.suggested
        elif p.suggested is not None:
            result = {
                "id": f"paws{rank}",
                "from_name": CHOICE_KEY,
                "to_name": IMAGE_KEY,
                "type": "choices",
                "value": {"choices": [p.suggested]},
            }
            score = float(p.confidence) if p.confidence is not None else None
            task["predictions"] = [{"model_version": "paws", "score": score, "result": [result]}]
        out.append(task)
    return out


def labeling_config(classes: list[str]) -> str:
    """A Label Studio labelling config for single-choice image classification into
    ``classes``, with the tag names the tasks use."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{IMAGE_KEY}" value="${IMAGE_KEY}"/>\n'
        f'  <Choices name="{CHOICE_KEY}" toName="{IMAGE_KEY}" choice="single" '
        'showInLine="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def write_tasks(
    s: Suggestions, out: str | Path, document_root: str | Path | None = None
) -> LabelStudioFiles:
    """Write the suggestions as a Label Studio tasks file ``out`` (and its labelling config
    beside it when the classes are known); see the module's doc."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    files = _image_files(s, out)
    root = _root(files, document_root)
    write_atomic(out, json.dumps(tasks(s, files, root), indent=2) + "\n")
    config = None
    if s.classes:
        config = out.with_suffix(".xml")
        write_atomic(config, labeling_config(s.classes))
    storage = Path(os.path.commonpath([str(f.parent) for f in files]))
    return LabelStudioFiles(out, config, root, storage)
