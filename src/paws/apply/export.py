"""The export format: a trained model as safetensors weights and a JSON description.

An export folder holds::

    model.json            format, version, kind, architecture (enough to rebuild the network
                          with paws.models), preprocessing (size, crop fraction, mean, std,
                          channels), class names, and how to classify (linear, or soft nearest
                          neighbours with temperature and embedding)
    model.safetensors     the network's weights: encoder, projection (and prediction) head, or
                          encoder, first head layer and classifier for a fine-tuned model
    support.safetensors   the labelled images' embeddings and labels, so that prediction needs
                          neither the training data nor its config (for a classifier, they
                          serve its known score only)

This module reads and writes the parts (:class:`Export`) and nothing else; :func:`paws.load`
(:mod:`paws.apply.predictor`) turns them into a model that predicts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paws.errors import UserError, first_line
from paws.files import check_out_dir, reason, write_atomic
from paws.rundir.checkpoint import KINDS

__all__ = [
    "MANIFEST",
    "FORMAT",
    "VERSION",
    "Export",
    "is_export",
    "write_export",
    "read_export",
    "check_manifest",
    "check_support",
    "source_of",
    "made_from",
]

MANIFEST = "model.json"
FORMAT = "paws-export"
VERSION = 1
_WEIGHTS = "model.safetensors"
_SUPPORT = "support.safetensors"


@dataclass
class Export:
    """The parts of an export.

    Attributes:
        kind: one of :data:`paws.rundir.checkpoint.KINDS`.
        architecture: :meth:`paws.models.Architecture.to_dict` of the network.
        preprocessing: ``{"size", "crop_fraction", "mean", "std", "channels"}``.
        classes: class names, in the order of the probabilities.
        classify: ``{"method": "linear"}``, or ``{"method": "snn", "features", "tau",
            "chunk_size"}`` for soft nearest neighbours against ``support``.
        weights: the network's state dict.
        support: ``{"embeddings": (M, D) float32, "labels": (M,) int64}`` for ``"snn"``,
            ``"known"`` (M, F): the embeddings of the known score when in another space, and
            the diffusion known score's graph: ``"graph_nodes"`` (G, F) and
            ``"graph_scores"`` (G,) (its threshold is ``classify["known"]["threshold"]``).
        batch_size: images per forward pass.
        source: the checkpoint file of a run directory the export was made from, with the run's
            own support and settings: ``{"checkpoint": file name, "size": bytes, "mtime_ns":
            its modification time}`` (:func:`made_from`); None otherwise.
    """

    kind: str
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    classes: list[str]
    classify: dict[str, Any]
    weights: dict[str, torch.Tensor]
    support: dict[str, torch.Tensor] | None = None
    batch_size: int = 256
    source: dict[str, Any] | None = None


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder."""
    return (Path(path) / MANIFEST).is_file()


def write_export(export: Export, out_dir: str | Path) -> Path:
    """Write ``export`` into ``out_dir`` (created; existing export files are replaced).

    Returns:
        The folder.
    """
    from safetensors.torch import save

    out = check_out_dir(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the export folder {out}: {reason(e)}") from e
    # The manifest goes first and comes back last, naming each file's checksum: an export
    # stopped part-way over an earlier one is no export, never one that mixes the two.
    (out / MANIFEST).unlink(missing_ok=True)
    sums: dict[str, str] = {}
    state = {k: v.detach().cpu().contiguous() for k, v in export.weights.items()}
    sums[_WEIGHTS] = _write_summed(out / _WEIGHTS, save(state, metadata={"format": FORMAT}))
    classify = dict(export.classify)
    if export.support is not None:
        support = {
            "embeddings": export.support["embeddings"].float().contiguous(),
            "labels": export.support["labels"].long().contiguous(),
        }
        for key in ("known", "graph_nodes", "graph_scores"):
            if export.support.get(key) is not None:
                support[key] = export.support[key].float().contiguous()
        sums[_SUPPORT] = _write_summed(out / _SUPPORT, save(support, metadata={"format": FORMAT}))
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
        "sha256": sums,
    }
    if export.source is not None:
        manifest["source"] = dict(export.source)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


def source_of(checkpoint: Path) -> dict[str, Any]:
    """What identifies a checkpoint file an export is made from: its name, size and time."""
    stat = Path(checkpoint).stat()
    return {"checkpoint": Path(checkpoint).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def made_from(folder: Path, checkpoint: Path) -> bool:
    """Whether the export ``folder`` was made from ``checkpoint`` as it is now, with its run's
    own support and settings (the manifest's ``source``): then it answers as the checkpoint
    does, and opening it skips rebuilding the support and the known score's graph."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        return isinstance(manifest, dict) and manifest.get("source") == source_of(checkpoint)
    except (OSError, ValueError):
        return False


def _write_summed(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its SHA-256."""
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _check_sums(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse an export folder whose files are not the ones its manifest was written with
    (an export stopped part-way, or files copied in from another export)."""
    sums = manifest.get("sha256")
    if sums is None:  # exports written before checksums were recorded
        return
    if not isinstance(sums, dict):
        raise _damaged(folder / MANIFEST, "sha256", "a mapping of file names to checksums", sums)
    classify = manifest.get("classify") or {}
    needed = [_WEIGHTS] + (
        [str(classify.get("support", _SUPPORT))] if classify.get("method") == "snn" else []
    )
    for name in needed:
        if name not in sums:
            raise _damaged(folder / MANIFEST, f"sha256.{name}", "the file's checksum", None)
    for name, expected in sums.items():
        path = folder / str(name)
        if Path(str(name)).name != str(name) or not path.is_file():
            raise UserError(f"{folder} is not a whole export: {name} is missing; export again")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise UserError(
                f"{folder} is not a whole export: {name} is not the file {MANIFEST} was "
                "written with (an export stopped part-way, or files of two exports); export again"
            )


def _damaged(path: Path, key: str, words: str, got: Any) -> UserError:
    shown = type(got).__name__ if isinstance(got, (dict, list, tuple)) else repr(got)
    return UserError(
        f"{path} is damaged: {key} must be {words}, got {shown[:60]}; export the model again "
        "with paws export"
    )


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _plain_name(v: Any) -> bool:
    """A file name inside the export folder (no folders, no way out of it)."""
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v


# What the entries of a manifest must be: (where, check, words). Entries absent from older
# exports take the defaults of read_export.
_PREPROCESSING = (
    ("size", lambda v: _is_int(v, 4, 4096), "a whole number in [4, 4096]"),
    ("crop_fraction", lambda v: _is_number(v, 1e-3, 1.0), "a number in (0, 1]"),
    ("channels", lambda v: v in (1, 3) and not isinstance(v, bool), "1 or 3"),
)
_CLASSIFY = (
    ("features", lambda v: v in ("head", "trunk"), "'head' or 'trunk'"),
    ("tau", lambda v: _is_number(v, 1e-4, 10.0), "a number in [0.0001, 10]"),
    ("chunk_size", lambda v: _is_int(v, 1, 2**31 - 1), "a whole number >= 1"),
    ("support", _plain_name, "a file name in the export folder"),
    ("num_support", lambda v: _is_int(v, 1, 2**40), "a whole number >= 1"),
)
_SOURCE = (
    ("checkpoint", lambda v: _plain_name(v) and v.endswith(".pt"), "a checkpoint's file name"),
    ("size", lambda v: _is_int(v, 0, 2**62), "a whole number of bytes"),
    ("mtime_ns", lambda v: _is_int(v, 0, 2**63 - 1), "a whole number of nanoseconds"),
)
_KNOWN = (
    ("kind", lambda v: v in ("diffusion", "soft", "nearest"), "'diffusion', 'soft' or 'nearest'"),
    ("features", lambda v: v in ("head", "trunk"), "'head' or 'trunk'"),
    ("tau", lambda v: _is_number(v, 1e-4, 10.0), "a number in [0.0001, 10]"),
    ("quantile", lambda v: _is_number(v, 0.0, 1.0), "a number in [0, 1]"),
    ("neighbours", lambda v: _is_int(v, 1, 1000), "a whole number in [1, 1000]"),
    ("nodes", lambda v: _is_int(v, 1, 10_000_000), "a whole number in [1, 10000000]"),
    ("alpha", lambda v: _is_number(v, 0.0, 1.0), "a number in [0, 1]"),
    ("threshold", lambda v: _is_number(v, float("-inf"), float("inf")), "a number"),
    ("graph_labeled", lambda v: _is_int(v, 1, 2**40), "a whole number >= 1"),
)


def _check_entries(path: Path, section: dict, prefix: str, checks: tuple) -> None:
    for key, ok, words in checks:
        if key in section and not ok(section[key]):
            raise _damaged(path, f"{prefix}{key}", words, section[key])


def _check_stats(path: Path, p: dict) -> None:
    """mean and std: one finite number per channel, std positive."""
    for key in ("mean", "std"):
        v = p.get(key)
        good = (
            isinstance(v, list)
            and len(v) == p["channels"]
            and all(_is_number(x, -1e6, 1e6) for x in v)
            and (key == "mean" or all(x > 0 for x in v))
        )
        if not good:
            words = f"a list of {p['channels']} " + ("numbers" if key == "mean" else "numbers > 0")
            raise _damaged(path, f"preprocessing.{key}", words, v)


def check_manifest(m: Any, path: Path) -> None:
    """Check every entry of an export's description, so that opening it cannot fail later.

    Raises:
        UserError: naming the file and the first entry that is missing or wrong.
    """
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path} is not a paws export description")
    version = m.get("version", 0)
    if not _is_int(version, 0, 2**31):
        raise _damaged(path, "version", "a whole number", version)
    if version > VERSION:
        raise UserError(
            f"{path} was written by a newer paws (export version {version}); upgrade paws"
        )
    for key, kind in (("architecture", dict), ("preprocessing", dict), ("classify", dict)):
        if not isinstance(m.get(key), kind):
            raise _damaged(path, key, "a mapping", m.get(key))
    if m.get("kind", "pretrain") not in KINDS:
        raise _damaged(path, "kind", ", ".join(KINDS), m.get("kind"))
    if not _is_int(m.get("batch_size", 256), 1, 65536):
        raise _damaged(path, "batch_size", "a whole number in [1, 65536]", m.get("batch_size"))
    classes = m.get("classes")
    if not isinstance(classes, list) or not classes or len(set(map(str, classes))) < len(classes):
        raise _damaged(path, "classes", "a non-empty list of distinct class names", classes)
    p = m["preprocessing"]
    for key, _, words in _PREPROCESSING:
        if key not in p:
            raise _damaged(path, f"preprocessing.{key}", words, None)
    _check_entries(path, p, "preprocessing.", _PREPROCESSING)
    _check_stats(path, p)
    c = m["classify"]
    if c.get("method") not in ("linear", "snn"):
        raise _damaged(path, "classify.method", "'linear' or 'snn'", c.get("method"))
    _check_entries(path, c, "classify.", _CLASSIFY)
    known = c.get("known")
    if known is not None and not isinstance(known, dict):
        raise _damaged(path, "classify.known", "a mapping", known)
    _check_entries(path, known or {}, "classify.known.", _KNOWN)
    unknown = sorted(set(known or {}) - {k for k, _, _ in _KNOWN})
    if unknown:
        names = ", ".join(k for k, _, _ in _KNOWN)
        raise _damaged(path, "classify.known", f"among {names}", unknown)
    if "source" in m:  # the checkpoint of a run it was made from (optional)
        source = m["source"]
        if not isinstance(source, dict):
            raise _damaged(path, "source", "a mapping", source)
        for key, _, words in _SOURCE:
            if key not in source:
                raise _damaged(path, f"source.{key}", words, None)
        _check_entries(path, source, "source.", _SOURCE)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"cannot read {path}: {first_line(e)}; export the model again") from e
    check_manifest(manifest, path)
    return manifest


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"export file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means a damaged file
        raise UserError(f"cannot read {path}: {first_line(e)}") from e


def check_support(support: dict[str, torch.Tensor], path: Path, num_classes: int) -> None:
    """Check an export's support tensors: (M, D) finite float embeddings, M >= 1, (M,) integer
    labels in [0, ``num_classes``), and optionally (M, F) finite float ``known`` embeddings.

    Raises:
        UserError: naming the file and the tensor.
    """
    for key in ("embeddings", "labels"):
        if key not in support:
            raise UserError(f"{path} lacks the '{key}' tensor; export the model again")
    emb, labels, known = support["embeddings"], support["labels"], support.get("known")
    if emb.dim() != 2 or len(emb) == 0 or not emb.is_floating_point():
        raise _damaged(path, "embeddings", "a non-empty (M, D) float tensor", _shape(emb))
    if labels.dim() != 1 or len(labels) != len(emb) or labels.is_floating_point():
        raise _damaged(path, "labels", f"({len(emb)},) integers", _shape(labels))
    if labels.min() < 0 or labels.max() >= num_classes:
        raise _damaged(
            path,
            "labels",
            f"class positions in [0, {num_classes})",
            [labels.min().item(), labels.max().item()],
        )
    if known is not None and (
        known.dim() != 2 or len(known) != len(emb) or not known.is_floating_point()
    ):
        raise _damaged(path, "known", f"a ({len(emb)}, F) float tensor", _shape(known))
    nodes, scores = support.get("graph_nodes"), support.get("graph_scores")
    if (nodes is None) != (scores is None):
        raise UserError(f"{path} holds half of the known score's graph; export the model again")
    width = (known if known is not None else emb).shape[1]
    if nodes is not None and (nodes.dim() != 2 or len(nodes) < len(emb) or nodes.shape[1] != width):
        raise _damaged(path, "graph_nodes", f"a (G >= {len(emb)}, {width}) tensor", _shape(nodes))
    if nodes is not None and (scores.dim() != 1 or len(scores) != len(nodes)):
        raise _damaged(path, "graph_scores", f"({len(nodes)},) scores", _shape(scores))
    checked = (("embeddings", emb), ("known", known), ("graph_nodes", nodes))
    for key, t in (*checked, ("graph_scores", scores)):
        if t is not None and not (t.is_floating_point() and bool(torch.isfinite(t).all())):
            raise UserError(f"{path}: its '{key}' hold NaN or infinite values; export again")


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} of {t.dtype}"


def read_export(folder: str | Path) -> Export:
    """The parts of an export folder, each checked (:func:`check_manifest`,
    :func:`check_support`) so that a model built from them can trust them.

    Raises:
        UserError: a missing, damaged or incomplete file, or a newer format version.
    """
    folder = Path(folder)
    m = _read_json(folder / MANIFEST)
    _check_sums(folder, m)
    classify = dict(m["classify"])
    export = Export(
        kind=str(m.get("kind", "pretrain")),
        architecture=dict(m["architecture"]),
        preprocessing=dict(m["preprocessing"]),
        classes=[str(c) for c in m["classes"]],
        classify=classify,
        weights={},
        batch_size=int(m.get("batch_size", 256)),
        source=dict(m["source"]) if "source" in m else None,
    )
    export.weights = _read_tensors(folder / _WEIGHTS)
    if classify["method"] != "linear" or "support" in classify:
        file = folder / str(classify.get("support", _SUPPORT))
        export.support = _read_tensors(file)
        check_support(export.support, file, len(export.classes))
        n = classify.get("num_support")
        if n is not None and n != len(export.support["labels"]):
            raise _damaged(
                folder / MANIFEST, "classify.num_support", f"{len(export.support['labels'])}", n
            )
        _check_graph(folder / MANIFEST, classify.get("known") or {}, export.support)
    return export


def _check_graph(path: Path, known: dict[str, Any], support: dict[str, torch.Tensor]) -> None:
    """The known score's graph and its entries in the manifest come together."""
    if "graph_nodes" not in support:
        return
    if "threshold" not in known:
        raise _damaged(path, "classify.known.threshold", "the graph's threshold", None)
    m = len(support["labels"])
    if known.get("graph_labeled") != m:
        raise _damaged(path, "classify.known.graph_labeled", f"{m}", known.get("graph_labeled"))
