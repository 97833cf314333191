"""A self-contained export of a trained model: safetensors weights and a JSON description.

An export folder holds::

    model.json            format, kind, architecture (enough to rebuild the network with
                          paws.models), preprocessing (size, crop fraction, mean, std, channels),
                          class names, and how to classify (linear, or soft nearest neighbours
                          with temperature and embedding)
    model.safetensors     the network's weights: encoder, projection (and prediction) head, or
                          encoder, first head layer and classifier for a fine-tuned model
    support.safetensors   pre-trained models only: the labelled images' embeddings and labels,
                          so that prediction needs neither the training data nor its config

:func:`paws.load` (:func:`paws.inference.load`) reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from paws.errors import UserError

if TYPE_CHECKING:
    from paws.inference import Predictor

__all__ = ["MANIFEST", "FORMAT", "VERSION", "write_export", "read_export"]

MANIFEST = "model.json"
FORMAT = "paws-export"
VERSION = 1
_WEIGHTS = "model.safetensors"
_SUPPORT = "support.safetensors"


def write_export(predictor: Predictor, out_dir: str | Path, progress: bool = False) -> Path:
    """Write ``predictor`` as an export folder.

    Args:
        predictor: the model (a pre-trained one's support is built now if it was not yet).
        out_dir: the folder (created; existing export files are replaced).
        progress: show progress while embedding the support.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    from paws.models import FineTunedClassifier

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = predictor.net
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / _WEIGHTS), metadata={"format": FORMAT})
    prep = predictor.preprocessing
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": predictor.kind,
        "architecture": predictor.architecture,
        "preprocessing": {
            "size": prep.size,
            "crop_fraction": prep.crop_fraction,
            "mean": list(prep.mean),
            "std": list(prep.std),
            "channels": prep.channels,
        },
        "batch_size": predictor.batch_size,
    }
    if isinstance(net, FineTunedClassifier):
        manifest["classes"] = predictor.classes
        manifest["classify"] = {"method": "linear"}
    else:
        support = predictor.load_support(progress)
        save_file(
            {
                "embeddings": support.embeddings.float().contiguous(),
                "labels": support.labels.long().contiguous(),
            },
            str(out / _SUPPORT),
            metadata={"format": FORMAT},
        )
        manifest["classes"] = support.classes
        manifest["classify"] = {
            "method": "snn",
            "features": support.features,
            "tau": predictor.tau,
            "chunk_size": predictor.chunk_size,
            "support": _SUPPORT,
            "num_support": len(support.labels),
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


def read_export(folder: str | Path, device: str | torch.device = "auto") -> Predictor:
    """A :class:`paws.inference.Predictor` from an export folder."""
    from paws.inference import Predictor, Preprocessing, Support, _load_weights, build_network

    folder = Path(folder)
    m = _read_json(folder / MANIFEST)
    try:
        arch, p, classify = m["architecture"], m["preprocessing"], m["classify"]
        classes = [str(c) for c in m["classes"]]
        prep = Preprocessing(
            int(p["size"]),
            float(p["crop_fraction"]),
            tuple(float(v) for v in p["mean"]),
            tuple(float(v) for v in p["std"]),
            int(p["channels"]),
        )
        net = build_network(arch)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / MANIFEST} is incomplete or damaged ({e!r})") from e
    _load_weights(net, _read_tensors(folder / _WEIGHTS), str(folder / _WEIGHTS))
    kwargs: dict[str, Any] = {
        "architecture": arch,
        "batch_size": int(m.get("batch_size", 256)),
        "device": device,
    }
    if classify.get("method") == "linear":
        return Predictor(net, str(m.get("kind", "finetune")), prep, classes=classes, **kwargs)
    tensors = _read_tensors(folder / classify.get("support", _SUPPORT))
    support = Support(
        tensors["embeddings"].float(),
        tensors["labels"].long(),
        classes,
        str(classify.get("features", "head")),
    )
    return Predictor(
        net,
        str(m.get("kind", "pretrain")),
        prep,
        features=support.features,
        tau=float(classify.get("tau", 0.1)),
        chunk_size=int(classify.get("chunk_size", 8192)),
        support=support,
        **kwargs,
    )
