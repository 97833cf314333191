"""The export format: a trained model as safetensors weights and a JSON description.

An export folder holds::

    model.json            format, version, kind, architecture (enough to rebuild the network
                          with paws.models), preprocessing (size, crop fraction, mean, std,
                          channels), class names, and how to classify (linear, or soft nearest
                          neighbours with temperature and embedding)
    model.safetensors     the network's weights: encoder, projection (and prediction) head, or
                          encoder, first head layer and classifier for a fine-tuned model
    support.safetensors   pre-trained models only: the labelled images' embeddings and labels,
                          so that prediction needs neither the training data nor its config

This module reads and writes the parts (:class:`Export`) and nothing else; :func:`paws.load`
(:mod:`paws.inference`) turns them into a model that predicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paws.errors import UserError

__all__ = ["MANIFEST", "FORMAT", "VERSION", "Export", "is_export", "write_export", "read_export"]

MANIFEST = "model.json"
FORMAT = "paws-export"
VERSION = 1
_WEIGHTS = "model.safetensors"
_SUPPORT = "support.safetensors"


@dataclass
class Export:
    """The parts of an export.

    Attributes:
        kind: ``"pretrain"``, ``"tighten"`` or ``"finetune"``.
        architecture: :meth:`paws.models.Architecture.to_dict` of the network.
        preprocessing: ``{"size", "crop_fraction", "mean", "std", "channels"}``.
        classes: class names, in the order of the probabilities.
        classify: ``{"method": "linear"}``, or ``{"method": "snn", "features", "tau",
            "chunk_size"}`` for soft nearest neighbours against ``support``.
        weights: the network's state dict.
        support: ``{"embeddings": (M, D) float32, "labels": (M,) int64}`` for ``"snn"``, and
            ``"known"`` (M, F): the embeddings of the known score when in another space.
        batch_size: images per forward pass.
    """

    kind: str
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    classes: list[str]
    classify: dict[str, Any]
    weights: dict[str, torch.Tensor]
    support: dict[str, torch.Tensor] | None = None
    batch_size: int = 256


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder."""
    return (Path(path) / MANIFEST).is_file()


def write_export(export: Export, out_dir: str | Path) -> Path:
    """Write ``export`` into ``out_dir`` (created; existing export files are replaced).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in export.weights.items()}
    save_file(state, str(out / _WEIGHTS), metadata={"format": FORMAT})
    classify = dict(export.classify)
    if export.support is not None:
        support = {
            "embeddings": export.support["embeddings"].float().contiguous(),
            "labels": export.support["labels"].long().contiguous(),
        }
        if export.support.get("known") is not None:
            support["known"] = export.support["known"].float().contiguous()
        save_file(support, str(out / _SUPPORT), metadata={"format": FORMAT})
        classify.update(support=_SUPPORT, num_support=len(support["labels"]))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": export.kind,
        "architecture": export.architecture,
        "preprocessing": export.preprocessing,
        "batch_size": export.batch_size,
        "classes": list(export.classes),
        "classify": classify,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a paws export description")
    if int(manifest.get("version", 0)) > VERSION:
        raise UserError(
            f"{path} was written by a newer paws (export version {manifest['version']}); "
            "upgrade paws"
        )
    return manifest


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"export file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means a damaged file
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e}") from e


def read_export(folder: str | Path) -> Export:
    """The parts of an export folder.

    Raises:
        UserError: a missing, damaged or incomplete file, or a newer format version.
    """
    folder = Path(folder)
    m = _read_json(folder / MANIFEST)
    try:
        classify = dict(m["classify"])
        export = Export(
            kind=str(m.get("kind", "pretrain")),
            architecture=dict(m["architecture"]),
            preprocessing=dict(m["preprocessing"]),
            classes=[str(c) for c in m["classes"]],
            classify=classify,
            weights={},
            batch_size=int(m.get("batch_size", 256)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / MANIFEST} is incomplete or damaged ({e!r})") from e
    export.weights = _read_tensors(folder / _WEIGHTS)
    if classify.get("method") != "linear":
        export.support = _read_tensors(folder / str(classify.get("support", _SUPPORT)))
    return export
