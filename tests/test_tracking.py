"""Experiment tracking: what MLflow and W&B hold equals the run directory, a resumed run continues
its tracked run, MLFLOW_TRACKING_URI is respected, and a failing tracker never stops training."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny import (
    EVALUATED,
    RESUMABLE,
    error_line,
    run_cli,
    run_paws,
    set_args,
    tiny_overrides,
    train_tiny,
)

from paws import rundir, tracking
from paws.config import load_config
from paws.pretrain.train import train


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracking server, no telemetry, no W&B login; W&B's own settings kept in tmp_path."""
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.chdir(tmp_path)  # anything written to the working directory lands here


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _client(uri: str):
    mlflow = pytest.importorskip("mlflow")
    return mlflow.MlflowClient(uri)


def _local(run: Path) -> str:
    return f"sqlite:///{(run / 'mlflow.db').resolve()}"


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_metrics_equal_csv(client, run_id: str, path: Path, prefix: str) -> None:
    """Every number of every row of ``path`` is in the MLflow run at its step (to the CSV's 6
    significant digits), and nothing else is."""
    rows = _rows(path)
    assert rows
    for column in rows[0]:
        if column == "step":
            continue
        want = [(int(r["step"]), float(r[column])) for r in rows if r[column] != ""]
        got = _history(client, run_id, prefix + column)
        assert [s for s, _ in got] == [s for s, _ in want], column
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), column


@pytest.fixture(scope="module")
def mlflow_run(labeled_and_test, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step run evaluated along the way, tracked by MLflow in its own directory."""
    pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("mlflow") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        return train_tiny(
            out, tiny_overrides(labeled_and_test, *EVALUATED, "run.trackers=[mlflow]")
        )


def test_mlflow_holds_the_run_directory(mlflow_run: Path) -> None:
    client = _client(_local(mlflow_run))
    record = tracking.read_records(mlflow_run)["mlflow"]
    assert record["tracking_uri"] is None  # the local store
    exp = client.get_experiment_by_name("paws")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_id == record["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    _assert_metrics_equal_csv(client, run.info.run_id, mlflow_run / "metrics.csv", "train/")
    _assert_metrics_equal_csv(client, run.info.run_id, mlflow_run / "evals.csv", "eval/")
    # Parameters: config.yaml, flattened; strings as they are, other values as JSON.
    config = _flat(yaml.safe_load((mlflow_run / "config.yaml").read_text()))
    params = run.data.params
    assert params.keys() == config.keys()
    assert {k: v if isinstance(config[k], str) else json.loads(v) for k, v in params.items()} == (
        config
    )
    assert params["run.trackers"] == '["mlflow"]' and params["data.root"] == "null"
    # Results and files.
    summary = json.loads((mlflow_run / "eval.json").read_text())
    assert run.data.metrics["final/top1"] == pytest.approx(summary["top1"])
    assert run.data.metrics["final/pretrained.top1"] == pytest.approx(summary["pretrained"]["top1"])
    assert _history(client, run.info.run_id, "final/top1")[0][0] == summary["step"] == 6
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval.json", "tighten.json", "confusion.png"} <= files
    local = Path(client.download_artifacts(run.info.run_id, "eval.json", str(mlflow_run.parent)))
    assert json.loads(local.read_text()) == summary
    assert (mlflow_run / "mlartifacts").is_dir()


def test_tracking_does_not_change_training(mlflow_run: Path, labeled_and_test, tmp_path) -> None:
    plain = train_tiny(tmp_path / "plain", tiny_overrides(labeled_and_test, *EVALUATED))
    tracked, untracked = (
        torch.load(r / "final.pt", weights_only=True) for r in (mlflow_run, plain)
    )
    assert all(torch.equal(tracked["model"][k], untracked["model"][k]) for k in untracked["model"])
    losses = [[r["loss"] for r in _rows(run / "metrics.csv")] for run in (mlflow_run, plain)]
    assert losses[0] == losses[1]


def test_report_is_added_to_the_tracked_run(mlflow_run: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    argv = ["--quiet", "report", str(mlflow_run), "--tsne-points", "0", "--grid-images", "0"]
    code, out, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    assert "mlflow" in out
    client = _client(_local(mlflow_run))
    run = client.get_run(tracking.read_records(mlflow_run)["mlflow"]["run_id"])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.png"} <= files
    assert run.info.status == "FINISHED"  # as it was


def test_an_export_joins_the_tracked_run_and_mlflow_serves_it_as_paws_predicts(
    mlflow_run: Path, labeled_and_test, tmp_path, capsys, monkeypatch
) -> None:
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from PIL import Image

    import paws

    export = tmp_path / "export"
    code, out, err = run_cli(
        ["--quiet", "export", str(mlflow_run), "--out", str(export)], capsys, monkeypatch
    )
    assert code == 0, err
    assert "export added to the run's tracked runs: mlflow" in out
    run_id = tracking.read_records(mlflow_run)["mlflow"]["run_id"]
    assert f"the export is the model runs:/{run_id}/model" in out
    client = _client(_local(mlflow_run))
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert exported == {f"export/{f.name}" for f in export.iterdir() if f.is_file()}
    assert client.get_run(run_id).info.status == "FINISHED"  # as it was

    mlflow.set_tracking_uri(_local(mlflow_run))
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    files = sorted(str(f) for f in labeled_and_test["test"].rglob("*.png"))
    answers = served.predict(pd.DataFrame({"path": files}))
    local = paws.load(export).predictions(files)
    assert answers["input"].tolist() == [p.source for p in local]
    assert answers["label"].tolist() == [p.label for p in local]
    assert answers["probability"].tolist() == pytest.approx([p.top[0][1] for p in local])
    assert answers["unknown"].tolist() == [p.unknown for p in local]
    # The same images as an array, and the top 2.
    pixels = np.stack([np.asarray(Image.open(f)) for f in files[:3]])
    top2 = served.predict(pixels, params={"top_k": 2})
    assert top2["input"].tolist() == [0, 1, 2] and "class_2" in top2.columns
    assert top2["class"].tolist() == answers["class"].tolist()[:3]


def _stop_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send this process SIGTERM once metrics.csv has its row of ``step`` (the run stops, with
    a checkpoint, at the next step)."""
    log = rundir.MetricsLog.log

    def log_then_stop(self, row):
        log(self, row)
        if self.path.name == rundir.METRICS and row["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rundir.MetricsLog, "log", log_then_stop)


def test_a_resumed_run_continues_its_mlflow_run(labeled_and_test, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    settings = tiny_overrides(labeled_and_test, *RESUMABLE, "run.trackers=[mlflow]")
    with monkeypatch.context() as mp:
        _stop_after(mp, 5)
        first = train(load_config(None, settings), out)
    assert first["status"] == "interrupted" and first["step"] == 6
    client = _client(_local(out))
    run_id = tracking.read_records(out)["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 7))

    # Resumed with TensorBoard added: it starts then and is given the steps logged so far.
    added = ["tensorboard"] if find_spec("tensorboard") else []
    resumed = f"run.trackers=[mlflow{''.join(', ' + a for a in added)}]"
    result = train(load_config(None, [*settings, resumed]), out, resume=True)
    assert result["status"] == "done" and result["step"] == 16
    assert tracking.read_records(out)["mlflow"]["run_id"] == run_id
    [run] = client.search_runs([client.get_experiment_by_name("paws").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    _assert_metrics_equal_csv(client, run_id, out / "metrics.csv", "train/")
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 17))
    if added:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 17))


def test_mlflow_tracking_uri_is_respected(labeled_and_test, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    changes = ["optim.steps=2", "tighten.after_training=false", "run.experiment=mine"]
    out = train_tiny(
        tmp_path / "run", tiny_overrides(labeled_and_test, *changes, "run.trackers=[mlflow]")
    )
    assert not (out / "mlflow.db").exists()
    assert tracking.read_records(out)["mlflow"]["tracking_uri"] == uri
    client = _client(uri)
    [run] = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [1, 2]
    assert "eval.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (LevelDB log format: 32 KiB blocks of chunks, each with a
    7-byte header: checksum, length, type; whole records are protobuf ``Record``s), once it has
    its exit record: W&B's own process writes them, and may still be at it after finish()."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline, records = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        data, pos, block, chunk, records = path.read_bytes(), 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
            if kind in (1, 4) and pos <= len(data):  # a full record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.1)
    return records


@pytest.mark.slow
def test_wandb_offline_writes_its_files_in_the_run_directory(
    labeled_and_test, tmp_path, capsys
) -> None:
    pytest.importorskip("wandb")
    out = train_tiny(
        tmp_path / "run", tiny_overrides(labeled_and_test, "optim.steps=3", "run.trackers=[wandb]")
    )
    run_id = tracking.read_records(out)["wandb"]["id"]
    [folder] = (out / "wandb").glob(f"offline-run-*-{run_id}")
    err = capsys.readouterr().err
    assert err.count("wandb: offline") == 1 and f"wandb sync {folder}" in err
    assert not (tmp_path / "wandb").exists()  # nothing outside the run directory
    files = folder / "files" / "paws"
    assert json.loads((files / "eval.json").read_text()) == json.loads(
        (out / "eval.json").read_text()
    )
    assert (files / "config.yaml").read_text() == (out / "config.yaml").read_text()
    records = _wandb_records(folder / f"run-{run_id}.wandb")
    history = [  # W&B stores "train/loss" as the nested key ["train", "loss"]
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    train_rows = [h for h in history if "train/loss" in h]
    want = _rows(out / "metrics.csv")
    assert [h["step"] for h in train_rows] == [int(r["step"]) for r in want] == [1, 2, 3]
    assert [h["train/loss"] for h in train_rows] == pytest.approx(
        [float(r["loss"]) for r in want], rel=1e-5
    )
    final = [h for h in history if "final/top1" in h]
    assert final and final[0]["final/top1"] == pytest.approx(
        json.loads((out / "eval.json").read_text())["top1"]
    )
    updates = [r.config.update for r in records if r.WhichOneof("record_type") == "config"]
    config = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for u in updates for i in u}
    assert config["run.trackers"] == ["wandb"] and config["optim.steps"] == 3


class _Recorder:
    """A tracker that keeps what it is given."""

    name, package, keeps_files = "wandb", "json", True

    def __init__(self, out: Path, experiment: str, previous: dict | None):
        self.record: dict[str, Any] = {"fake": True}
        self.calls: list[tuple] = []
        type(self).last = self

    def log_params(self, params):
        self.calls.append(("params", len(params)))

    def log_metrics(self, values, step, prefix=""):
        self.calls.append(("metrics", prefix, step))

    def log_artifact(self, path, folder=""):
        self.calls.append(("file", path.name))

    def log_final(self, values, step):
        self.log_metrics(values, step, tracking.FINAL)

    def log_confusion(self, confusion, classes, step):
        self.calls.append(("confusion", len(classes), step))

    def close(self, status):
        self.calls.append(("close", status))


class _Broken(_Recorder):
    """A tracker whose server goes away after the config."""

    name = "mlflow"

    def log_metrics(self, values, step, prefix=""):
        raise ConnectionError("tracking server unreachable\nsecond line of the error")


class _Unopenable(_Recorder):
    name = "tensorboard"

    def __init__(self, out: Path, experiment: str, previous: dict | None):
        raise RuntimeError("cannot open the log folder")


def test_a_failing_tracker_is_reported_once_and_dropped(
    labeled_and_test, tmp_path, capsys, monkeypatch
) -> None:
    fakes = {c.name: c for c in (_Unopenable, _Broken, _Recorder)}
    monkeypatch.setattr(tracking, "TRACKERS", fakes)
    settings = ["run.trackers=[tensorboard, mlflow, wandb]", "optim.steps=3"]
    out = train_tiny(tmp_path / "run", tiny_overrides(labeled_and_test, *settings))
    lines = capsys.readouterr().err.splitlines()
    failed = [line for line in lines if "tracking failed" in line]
    assert failed == [
        "tensorboard tracking failed (RuntimeError: cannot open the log folder); "
        "training goes on without it",
        "mlflow tracking failed (ConnectionError: tracking server unreachable); "
        "training goes on without it",
    ]
    # The run is whole, and the tracker that works got everything.
    assert [r["step"] for r in _rows(out / "metrics.csv")] == ["1", "2", "3"]
    assert (out / "final.pt").is_file() and (out / "eval.json").is_file()
    calls = _Recorder.last.calls
    assert calls[0][0] == "params" and calls[-1] == ("close", "done")
    assert [c[2] for c in calls if c[:2] == ("metrics", "train/")] == [1, 2, 3]
    assert ("file", "eval.json") in calls and ("file", "config.yaml") in calls
    assert set(tracking.read_records(out)) == {"mlflow", "wandb"}  # the ones that opened
    # Dropped: nothing more after its first failure, not even close.
    assert [c[0] for c in _Broken.last.calls] == ["params", "file"]


def test_a_tracker_not_installed_is_a_one_line_error(
    labeled_and_test, tmp_path, capsys, monkeypatch
) -> None:
    class Missing(_Recorder):
        package = "no_such_tracking_package"

    monkeypatch.setattr(tracking, "TRACKERS", {"wandb": Missing})
    settings = tiny_overrides(labeled_and_test, "run.trackers=[wandb]")
    argv = ["train", "--out", str(tmp_path / "run"), *[a for s in settings for a in ("--set", s)]]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    assert error_line(err) == (
        "run.trackers asks for wandb, which is not installed: pip install 'paws-ssl[wandb]'"
    )


def test_an_untracked_run_writes_no_tracker_files(shared_run) -> None:
    _, run = shared_run
    assert not any((run / name).exists() for name in ("trackers.json", "mlflow.db", "wandb"))


def test_wandb_offline_as_asked_and_the_report_joins_its_one_run_folder(
    labeled_and_test, tmp_path, capsys, monkeypatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = train_tiny(
        tmp_path / "run", tiny_overrides(labeled_and_test, "optim.steps=2", "run.trackers=[wandb]")
    )
    err = capsys.readouterr().err
    assert "wandb: offline, as asked (WANDB_MODE)" in err and "no W&B key" not in err
    record = tracking.read_records(out)["wandb"]
    [folder] = (out / "wandb").glob("offline-run-*")
    assert record["offline"] and Path(record["dir"]) == folder
    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    assert tracking.log_files(out, [report]) == ["wandb"]
    assert [folder] == list((out / "wandb").glob("offline-run-*"))  # no second run folder
    assert (folder / "files" / "paws" / "report.html").read_text() == "<html></html>"


def test_mlflow_says_nothing_below_a_warning_on_the_command_line(labeled_and_test, tmp_path):
    pytest.importorskip("mlflow")
    settings = tiny_overrides(labeled_and_test, "optim.steps=2", "run.trackers=[mlflow]")
    proc = run_paws("train", *set_args(settings), "--out", str(tmp_path / "run"))
    assert "mlflow: run " in proc.stderr  # paws's own line
    assert " INFO mlflow" not in proc.stderr and "INFO  [alembic" not in proc.stderr, proc.stderr


def test_tensorboard_holds_the_config_against_the_final_numbers(labeled_and_test, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = train_tiny(
        tmp_path / "run", tiny_overrides(labeled_and_test, *EVALUATED, "run.tensorboard=true")
    )
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    data = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
    [start] = [d.session_start_info for d in data if d.HasField("session_start_info")]
    config = load_config(out / "config.yaml")
    assert start.hparams["optim.batch_size"].number_value == config.optim.batch_size
    assert start.hparams["model.encoder"].string_value == config.model.encoder
    [experiment] = [d.experiment for d in data if d.HasField("experiment")]
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert "final/top1" in metrics
    top1 = json.loads((out / "eval.json").read_text())["top1"]
    [final] = events.Scalars("final/top1")
    assert final.value == pytest.approx(top1, rel=1e-6)
    # The confusion matrix as a picture, and its counts with the class names.
    predictions = json.loads((out / "predictions.json").read_text())
    [image] = events.Images("final/confusion")
    picture = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert np.array_equal(picture, tracking.confusion_image(np.array(predictions["confusion"])))
    [text] = [e for e in events.Tensors("final/confusion/text_summary")]
    table = text.tensor_proto.string_val[0].decode()
    assert all(f"| {c} | " in table for c in predictions["classes"])


def test_a_confusion_matrix_picture_is_its_rows_shares_from_white_to_blue():
    picture = tracking.confusion_image(np.array([[3, 1], [0, 0]]), cell=2)
    assert picture.shape == (4, 4, 3) and picture.dtype == np.uint8
    white, blue = np.array([255, 255, 255]), np.array([8, 48, 107])
    assert (picture[0, 0] == np.round(white + 0.75 * (blue - white))).all()  # 3 of the 4
    assert (picture[0, 3] == np.round(white + 0.25 * (blue - white))).all()
    assert (picture[3, 3] == white).all() and (picture[1, 1] == picture[0, 0]).all()  # no row
    assert tracking.confusion_image(np.eye(3)).shape == (255, 255, 3)  # about 256 pixels
