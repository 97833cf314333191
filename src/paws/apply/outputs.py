"""Files of a model's outputs: predictions as CSV or JSON, embeddings as .npy or .safetensors.

``paws predict`` and ``paws embed`` write these; Python users get the same files from the same
functions.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from paws.errors import UserError
from paws.files import check_out_file, write_atomic, write_with

if TYPE_CHECKING:
    from paws.apply.predictor import Prediction

__all__ = ["predictions_text", "write_embeddings", "check_embedding_names", "EMBEDDING_SUFFIXES"]

EMBEDDING_SUFFIXES = (".npy", ".safetensors")


def predictions_text(
    files: Sequence[str | Path], predictions: Sequence[Prediction], fmt: str = "csv"
) -> str:
    """The predictions of ``files`` as text.

    Args:
        files: the images, in order.
        predictions: what the model says of each
            (:meth:`paws.apply.predictor.Predictor.predictions`).
        fmt: ``"csv"`` (``file,class_1,probability_1,...,score,unknown``) or ``"json"`` (a list
            of ``{"file", "top": [{"class", "probability"}, ...], "score", "unknown"}``); the
            score and the unknown flag are empty (null) for a fine-tuned classifier.
    """
    if fmt == "json":
        rows = [
            {
                "file": str(f),
                "top": [{"class": c, "probability": pr} for c, pr in p.top],
                "score": p.score,
                "unknown": p.unknown if p.score is not None else None,
            }
            for f, p in zip(files, predictions)
        ]
        return json.dumps(rows, indent=2) + "\n"
    if fmt != "csv":
        raise UserError(f"predictions are written as csv or json, not {fmt!r}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    k = len(predictions[0].top) if predictions else 0
    header = ["file"]
    for i in range(1, k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    writer.writerow([*header, "score", "unknown"])
    for f, p in zip(files, predictions):
        known = p.score is not None
        tail = [f"{p.score:.6f}", str(p.unknown).lower()] if known else ["", ""]
        writer.writerow([str(f)] + [v for c, pr in p.top for v in (c, f"{pr:.6f}")] + tail)
    return buf.getvalue()


def check_embedding_names(path: str | Path, files: Sequence[str | Path]) -> None:
    """Refuse names a ``.npy``'s file list cannot hold: one name a line, a name with a line
    break would read as two files, and the rows would no longer match the names.

    Raises:
        UserError: naming the first such file and what to do.
    """
    if Path(path).suffix != ".npy":
        return
    for f in files:
        name = str(f)
        if name.splitlines() != [name]:  # \n, \r and the other breaks readers split on
            raise UserError(
                f"the file name {name!r} holds a line break, which the one-name-a-line list "
                f"{Path(path).with_suffix('.txt')} cannot hold; rename the file, or write "
                ".safetensors (its file list is JSON)"
            )


def write_embeddings(
    path: str | Path, embeddings: torch.Tensor, files: Sequence[str | Path], features: str
) -> str:
    """Write (N, D) ``embeddings`` of ``files`` to ``path``.

    ``.npy``: the array, with the file list beside it in ``.txt``; ``.safetensors``: the
    tensor ``embeddings`` with the file list and ``features`` in its metadata.

    Returns:
        Where they went, in words.
    """
    out = Path(path)
    if out.suffix not in EMBEDDING_SUFFIXES:
        raise UserError(f"--out must end in .npy or .safetensors, got {out.name}")
    names = [str(f) for f in files]
    check_embedding_names(out, names)
    check_out_file(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        write_with(out, lambda f: np.save(f, embeddings.numpy()))
        write_atomic(out.with_suffix(".txt"), "\n".join(names) + "\n")
        return f"{out} (files listed in {out.with_suffix('.txt')})"
    from safetensors.torch import save

    data = save(
        {"embeddings": embeddings.contiguous()},
        metadata={"files": json.dumps(names), "features": features},
    )
    write_atomic(out, data)
    return str(out)
