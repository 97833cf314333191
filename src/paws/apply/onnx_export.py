"""ONNX export: a trained model that classifies on its own, with ONNX Runtime and no paws.

``paws export RUN --format onnx`` (:func:`export_onnx`) writes a folder of three files::

    model.onnx     images (N, C, S, S) float32 -> probabilities (N, K), embeddings (N, D).
                   A pre-trained or tightened model classifies by soft nearest neighbours
                   against its support embeddings, which are constants of the graph:
                   softmax(normalise(e) @ normalise(supports).T / tau), summed per class, as
                   :func:`paws.method.snn.snn_classify`; a fine-tuned model returns the softmax of
                   its classifier's logits. ``embeddings`` is the embedding it classifies.
    encoder.onnx   images (N, C, S, S) -> features (N, F): the bare encoder trunk.
    onnx.json      classes, the preprocessing that makes ``images``, every input and output
                   with its shape, and how the model classifies (tau, features, supports).

Both ONNX files also carry the class names, the preprocessing and the way of classifying in
their own ``metadata_props`` (``paws.classes``, ``paws.preprocessing``, ``paws.classify``,
``paws.kind``, ``paws.format``; JSON text), so that a file copied alone still says what it is.

The batch axis N (named ``batch`` in the graphs) is dynamic; weights beyond ONNX's 2 GB limit
go to a ``.data`` file beside their graph, which ONNX Runtime finds by itself. The graphs wrap
the network of a :class:`paws.apply.predictor.Predictor` and are written by
``torch.onnx.export`` (its torch.export-based exporter, with onnxscript); :func:`check_onnx`
runs them with ONNX Runtime against the PyTorch model.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from paws.apply.graphs import Trunk
from paws.apply.predictor import Predictor
from paws.data.images import GREY
from paws.data.transforms import eval_resize
from paws.errors import UserError
from paws.files import write_atomic, write_folder_files, write_with

__all__ = [
    "FORMAT",
    "VERSION",
    "MODEL",
    "ENCODER",
    "DESCRIPTION",
    "preprocessing_description",
    "export_onnx",
    "metadata_props",
    "reference_outputs",
    "run_onnx",
    "check_onnx",
]

FORMAT = "paws-onnx"
VERSION = 1
MODEL = "model.onnx"
ENCODER = "encoder.onnx"
DESCRIPTION = "onnx.json"
INPUT = "images"
_INSTALL = "pip install 'paws-ssl[onnx]'"
# ONNX files hold at most 2 GB; larger weights go to a side file next to the graph.
_PROTOBUF_LIMIT = 2_000_000_000


# --------------------------------------------------------------------------------------------
# The description.


def preprocessing_description(predictor: Predictor) -> dict[str, Any]:
    """How an image file becomes one row of the ``images`` input, as JSON values and words."""
    p = predictor.preprocessing
    resize = eval_resize(p.size, p.crop_fraction)
    if p.channels == 1:
        mode = "grey: Pillow mode 'L', L = {:g} R + {:g} G + {:g} B (ITU-R 601 luma)".format(*GREY)
    else:
        mode = "RGB: Pillow mode 'RGB' (grey images repeated on 3 channels)"
    return {
        "size": p.size,
        "crop_fraction": p.crop_fraction,
        "resize": resize,
        "mean": list(p.mean),
        "std": list(p.std),
        "channels": p.channels,
        "steps": [
            "palette and transparent images: composite on white",
            f"convert to {mode}",
            "to float32 in [0, 1] (divide by 255), channels first: (C, H, W)",
            f"resize so that the shorter side is {resize} pixels, keeping the aspect ratio "
            "(bilinear, antialiased, on the float values: nothing rounded back to 8 bits)",
            f"crop the centre {p.size} x {p.size} pixels",
            "subtract mean and divide by std, per channel",
            f"stack the images into a batch (N, {p.channels}, {p.size}, {p.size})",
        ],
        "torch": (
            "x = pixels as a float32 (C, H, W) tensor / 255; if min(H, W) != "
            f"{resize}: x = F.interpolate(x[None], size=(round(H * {resize} / min(H, W)), "
            f"round(W * {resize} / min(H, W))), mode='bilinear', antialias=True, "
            f"align_corners=False)[0]; x = x[:, top:top + {p.size}, left:left + {p.size}] "
            f"with top = (h - {p.size}) // 2, left = (w - {p.size}) // 2; "
            "x = (x.clamp(0, 1) - mean) / std"
        ),
    }


def _io(name: str, *dims: int | str) -> dict[str, Any]:
    return {"name": name, "shape": ["batch", *dims], "dtype": "float32"}


def _description(
    predictor: Predictor, dims: dict[str, int], opset: int, seconds: float
) -> dict[str, Any]:
    p = predictor.preprocessing
    images = _io(INPUT, p.channels, p.size, p.size)
    classify = predictor.describe()
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": predictor.kind,
        "classes": list(predictor.classes),
        "preprocessing": preprocessing_description(predictor),
        "classify": classify,
        "models": {
            "classifier": {
                "file": MODEL,
                "inputs": [images],
                "outputs": [
                    _io("probabilities", len(predictor.classes)),
                    _io("embeddings", dims["embeddings"]),
                ],
            },
            "encoder": {
                "file": ENCODER,
                "inputs": [images],
                "outputs": [_io("features", dims["features"])],
            },
        },
        "batch_axis": "the first axis of every input and output ('batch') takes any size",
        "opset": opset,
        "exporter": f"torch.onnx (torch.export) in torch {torch.__version__}",
        "export_seconds": round(seconds, 2),
        "architecture": predictor.architecture.to_dict(),
    }


# --------------------------------------------------------------------------------------------
# Writing and checking.


def _require(*modules: str) -> None:
    """A one-line error naming what to install when an ONNX package is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: {_INSTALL}")
    if torch.__version__ < (2, 5):  # type: ignore[operator]
        raise UserError(f"ONNX export needs torch >= 2.5 (this is {torch.__version__})")


def _export(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    outputs: list[str],
    written: Callable[[], None] | None = None,
) -> int:
    """Write ``module`` as ONNX with a dynamic batch axis, whole or not at all
    (:func:`paws.files.write_folder_files`); ``written()`` is called once the file is
    complete in its staging folder, before it replaces the old one. Returns the opset."""
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    opset = [0]

    def write(staged: Path) -> None:
        program = torch.onnx.export(
            module,
            (example,),
            str(staged),
            dynamo=True,
            verbose=False,
            external_data=size > _PROTOBUF_LIMIT,
            input_names=[INPUT],
            output_names=outputs,
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
        )
        if program is not None:
            opset[0] = int(program.model.opset_imports.get("", 0))
        if written is not None:
            written()

    write_folder_files(path.parent, path.name, write)
    return opset[0]


def export_onnx(predictor: Predictor, out_dir: str | Path, progress: bool = False) -> Path:
    """Write ``model.onnx``, ``encoder.onnx`` and ``onnx.json`` into ``out_dir`` (created).

    Args:
        predictor: the model and its preprocessing; a pre-trained model's support is embedded
            now if it was not yet, and baked into ``model.onnx``.
        out_dir: the folder.
        progress: show progress while the support is embedded.

    Returns:
        The folder.
    """
    _require("onnx", "onnxscript")
    predictor.ready(progress)
    start = time.perf_counter()
    net = copy.deepcopy(predictor.net).cpu().eval()  # exported on the CPU, predictor untouched
    graph, trunk = predictor.graph(net).eval(), Trunk(net).eval()
    p = predictor.preprocessing
    # Two images: a batch of one would be specialised to a fixed size by torch.export.
    example = torch.zeros(2, p.channels, p.size, p.size)
    with torch.no_grad():
        dims = {"embeddings": graph(example)[1].shape[1], "features": trunk(example).shape[1]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # The description goes once the first new model is complete (a full disk before that
    # leaves the earlier export whole) and comes back last: an export stopped part-way over
    # an earlier one leaves no onnx.json that describes models it did not write.
    def unlink_description() -> None:
        (out / DESCRIPTION).unlink(missing_ok=True)

    outputs = ["probabilities", "embeddings"]
    opset = _export(graph, example, out / MODEL, outputs, unlink_description)
    _export(trunk, example, out / ENCODER, ["features"])
    seconds = time.perf_counter() - start
    description = _description(predictor, dims, opset, seconds)
    for name in (MODEL, ENCODER):
        _add_metadata(out / name, metadata_props(description))
    write_atomic(out / DESCRIPTION, json.dumps(description, indent=2) + "\n")
    return out


def metadata_props(description: dict[str, Any]) -> dict[str, str]:
    """What an ONNX file says of itself (its ``metadata_props``, which ONNX Runtime reads as
    ``get_modelmeta().custom_metadata_map``): the class names, the preprocessing and how it
    classifies, as JSON text, so that the file alone is enough to use it."""
    return {
        "paws.format": f"{description['format']} {description['version']}",
        "paws.kind": str(description["kind"]),
        "paws.classes": json.dumps(description["classes"]),
        "paws.preprocessing": json.dumps(description["preprocessing"]),
        "paws.classify": json.dumps(description["classify"]),
    }


def _add_metadata(path: Path, props: dict[str, str]) -> None:
    """Rewrite the ONNX file ``path`` with ``props`` in its metadata (external weights, for a
    model over 2 GiB, stay where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    write_with(path, lambda f: f.write(model.SerializeToString()))


@torch.no_grad()
def reference_outputs(predictor: Predictor, images: torch.Tensor) -> dict[str, np.ndarray]:
    """What the ONNX graphs must return, computed by PyTorch as :class:`Predictor` does.

    Args:
        predictor: the model.
        images: (N, C, S, S) preprocessed float32 images.

    Returns:
        ``{"probabilities": (N, K), "embeddings": (N, D), "features": (N, F)}``.
    """
    net = predictor.net
    x = images.to(predictor.device)
    emb = net.embed(x, predictor.classify_features)
    probs = predictor.probabilities(emb)
    out = {"probabilities": probs, "embeddings": emb, "features": net.embed(x, "trunk")}
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def run_onnx(folder: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Both graphs of an ONNX export run by ONNX Runtime on the CPU.

    Args:
        folder: the export folder.
        images: (N, C, S, S) preprocessed float32 images.

    Returns:
        ``{"probabilities": (N, K), "embeddings": (N, D), "features": (N, F)}``.
    """
    _require("onnxruntime")
    import onnxruntime as ort

    out: dict[str, np.ndarray] = {}
    for name in (MODEL, ENCODER):
        path = Path(folder) / name
        if not path.is_file():
            raise UserError(f"ONNX export file missing: {path}")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, {INPUT: np.ascontiguousarray(images, dtype=np.float32)})
        out.update(zip(names, values))
    return out


def check_onnx(folder: str | Path, predictor: Predictor, batch: int = 7) -> dict[str, float]:
    """The largest absolute difference of each ONNX Runtime output from PyTorch's, on a batch
    of ``batch`` random normal images (drawn from a fixed seed; the global generator is left
    alone): ``{"probabilities", "embeddings", "features"}``."""
    p = predictor.preprocessing
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, p.channels, p.size, p.size, generator=gen)
    expected = reference_outputs(predictor, x)
    got = run_onnx(folder, x.numpy())
    return {k: float(np.abs(got[k] - v).max()) for k, v in expected.items()}
