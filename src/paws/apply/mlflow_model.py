"""A paws export as an MLflow model: ``mlflow.pyfunc.load_model(uri).predict(...)`` answers as
``paws predict`` does, and ``mlflow models serve`` serves it.

The model is MLflow's "custom loader" form: the export folder (:mod:`paws.apply.export`) is the
model's data, and this module is its loader (``_load_pyfunc``), so nothing is pickled and the
model loads wherever ``paws-ssl`` is installed. Its input is image files (a DataFrame with a
``path`` column, else its first column; or a list of paths) or images as arrays (an (N, H, W)
or (N, H, W, C) uint8 array); its output a DataFrame of one row per readable image: ``input``
(the file, or the position of an array image), ``label`` (the class, or ``unknown``),
``class`` and ``probability`` (the most probable class) and ``score`` and ``unknown`` (the known
score and its verdict), the same values as ``paws predict``'s CSV.

:func:`log_model` adds such a model to the MLflow run a run directory's ``trackers.json``
records, when ``paws export`` exports that run.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from paws.apply.load import load
from paws.apply.predictor import Predictor
from paws.errors import UserError
from paws.tracking import MLflow, read_records

__all__ = ["PawsModel", "log_model", "MODEL_PATH"]

MODEL_PATH = "model"  # the model's folder among the MLflow run's files


class PawsModel:
    """What ``mlflow.pyfunc.load_model`` returns the ``predict`` of: a predictor of an export."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """The answers for ``model_input`` (see the module's doc) as a pandas DataFrame.

        Args:
            model_input: a DataFrame of paths, a list of paths, or an (N, H, W[, C]) array.
            params: ``{"top_k": K}`` adds ``class_2``/``probability_2``... up to K.
        """
        import pandas as pd

        top_k = int((params or {}).get("top_k", 1))
        images = _images(model_input)
        rows = []
        for p in self.predictor.predictions(images, top_k=top_k):
            row: dict[str, Any] = {"input": p.source, "label": p.label}
            for i, (name, prob) in enumerate(p.top, 1):
                suffix = "" if i == 1 else f"_{i}"
                row[f"class{suffix}"], row[f"probability{suffix}"] = name, float(prob)
            row["score"], row["unknown"] = p.score, p.unknown
            rows.append(row)
        return pd.DataFrame(rows)


def _images(model_input: Any) -> Any:
    """The images a model input names: file paths, or an array of images."""
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        # A model input is always a batch: (N, H, W) is N grey images, not one of N channels.
        return model_input[..., None] if model_input.ndim == 3 else model_input
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a DataFrame
        column = "path" if "path" in columns else columns[0]
        return [str(v) for v in model_input[column].tolist()]
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return [str(v) for v in model_input]
    raise UserError(
        f"a paws MLflow model takes image paths or an image array, got {type(model_input)}"
    )


def _load_pyfunc(data_path: str) -> PawsModel:
    """MLflow's loader hook: the model saved with ``data_path`` the export folder."""
    return PawsModel(load(data_path, device="auto"))


def _requirement() -> str:
    try:
        return f"paws-ssl=={version('paws-ssl')}"
    except PackageNotFoundError:
        return "paws-ssl"


def log_model(run_dir: str | Path, export: str | Path) -> str | None:
    """Add the export folder ``export`` as an MLflow model to the MLflow run of ``run_dir``.

    Returns:
        The model's URI (``runs:/<run id>/model``), or None when the run is not tracked by
        MLflow.
    """
    record = read_records(Path(run_dir)).get("mlflow")
    if not record or not record.get("run_id"):
        return None
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    client = mlflow.MlflowClient(MLflow.store(Path(run_dir), record))
    # Declared, or MLflow drops the parameter before it reaches predict.
    params = ParamSchema([ParamSpec("top_k", "long", 1)])
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / MODEL_PATH
        mlflow.pyfunc.save_model(
            path=str(saved),
            loader_module=__name__,
            data_path=str(export),
            pip_requirements=[_requirement()],
            signature=ModelSignature(inputs=None, params=params),
        )
        client.log_artifacts(record["run_id"], str(saved), MODEL_PATH)
    return f"runs:/{record['run_id']}/{MODEL_PATH}"
