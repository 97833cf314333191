"""Label Studio both ways: ``paws suggest --format labelstudio`` writes tasks with the suggestion
as a pre-annotation (:mod:`paws.labelling.labelstudio`), and Label Studio's JSON, JSON_MIN and
CSV exports are labels files as they are (:mod:`paws.data.labelstudio`). The fixtures follow
Label Studio's documented formats (its task format with ``predictions``, its export formats);
Label Studio itself is not needed."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import error_line, run_cli, set_args, tiny_overrides

from paws.config import load_config
from paws.data.images import ImageSet
from paws.data.labels import read_labels_file
from paws.data.sources import load_datasets
from paws.errors import UserError
from paws.labelling.labelstudio import write_tasks
from paws.labelling.suggest import Pool, Suggestion, Suggestions

LOCAL = "/data/local-files/?d="
STUDIO = ["id", "choice", "annotator", "annotation_id", "created_at", "updated_at", "lead_time"]


def _suggest(run: Path, out: Path, capsys, monkeypatch, *more: str) -> str:
    code, _, err = run_cli(
        ["suggest", str(run), "-n", "6", "--out", str(out), *more], capsys, monkeypatch
    )
    assert code == 0, err
    return err


def _annotate(tasks: list[dict], truth: dict[str, str]) -> list[dict]:
    """What Label Studio's JSON export holds after a person labelled the tasks: the first task
    left alone, the second skipped (cancelled), the others labelled with ``truth``."""
    exported = []
    for i, task in enumerate(tasks):
        task = {"id": 100 + i, **task, "annotations": []}
        if i >= 1:
            label = truth[task["data"]["paws_path"]]
            result = {
                "id": f"a{i}",
                "from_name": "choice",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [label]},
            }
            task["annotations"] = [{"id": i, "result": [result], "was_cancelled": i == 1}]
        exported.append(task)
    return exported


def test_suggestions_go_to_label_studio_and_its_export_comes_back(
    shared_run, tmp_path, capsys, monkeypatch
):
    paths, run = shared_run
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    err = _suggest(run, tmp_path / "next.json", capsys, monkeypatch)
    _suggest(run, tmp_path / "next.csv", capsys, monkeypatch, "--quiet")
    tasks = json.loads((tmp_path / "next.json").read_text())
    rows = list(csv.DictReader((tmp_path / "next.csv").open()))
    said = re.search(r"DOCUMENT_ROOT=(\S+), add a Local files storage of (\S+) ", err)
    assert said and "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true" in err
    root, storage = Path(said[1]), Path(said[2])
    assert storage.parent == root  # a storage path below the root, as Label Studio wants
    assert paths["unlabeled"].resolve() in (storage, *storage.parents)
    assert len(tasks) == len(rows) == 6
    for rank, (task, row) in enumerate(zip(tasks, rows), start=1):
        data = task["data"]
        assert data["image"].startswith(LOCAL)  # served by the local-files storage
        served = root / unquote(data["image"][len(LOCAL) :])
        assert served.is_file() and str(served) == data["paws_path"]
        assert served == (tmp_path / row["path"]).resolve()  # the CSV's image, same rank
        assert data["paws_rank"] == rank and data["paws_reason"] == row["reason"]
        if row["suggested_label"].startswith("new:"):  # a group of no labelled class
            assert "predictions" not in task and data["paws_group"] == row["suggested_label"]
            continue
        (prediction,) = task["predictions"]
        assert prediction["score"] == pytest.approx(float(row["confidence"]), abs=1e-4)
        (result,) = prediction["result"]
        assert {k: result[k] for k in ("from_name", "to_name", "type")} == {
            "from_name": "choice",
            "to_name": "image",
            "type": "choices",
        }
        assert result["value"] == {"choices": [row["suggested_label"]]}
    config = ET.parse(tmp_path / "next.xml").getroot()
    image, choices = config.find("Image"), config.find("Choices")
    assert image.get("name") == "image" and image.get("value") == "$image"
    assert choices.get("name") == "choice" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices] == [f"class{c}" for c in range(4)]
    # A person labels them in Label Studio; its JSON export is the next round's labels file.
    truth = {t["data"]["paws_path"]: Path(t["data"]["paws_path"]).parent.name for t in tasks}
    export = tmp_path / "project-1-at-2024.json"
    export.write_text(json.dumps(_annotate(tasks, truth)))
    labels = read_labels_file(export)
    assert labels.unlabelled == 2  # one never opened, one skipped
    assert {r.path: r.label for r in labels.rows} == {
        t["data"]["paws_path"]: truth[t["data"]["paws_path"]] for t in tasks[2:]
    }
    # With accept_suggested, the unlabelled tasks take paws's own suggestion.
    # (a task of a group of no labelled class has no suggestion, and stays unlabelled).
    accepted = read_labels_file(export, accept_suggested=True)
    suggested = [t for t in tasks[:2] if "predictions" in t]
    assert len(accepted.rows) == 4 + len(suggested)
    if "predictions" in tasks[0]:
        first = tasks[0]["predictions"][0]["result"][0]["value"]["choices"][0]
        assert accepted.rows[0].label == first
    folders = {"unlabeled": paths["unlabeled"]}
    cfg = load_config(None, [*tiny_overrides(folders), f"data.labels_file={export}"])
    data = load_datasets(cfg)
    got = {n: data.classes[y] for n, y in zip(data.labeled.names, data.labeled.labels)}
    assert got == {r.path: r.label for r in labels.rows}


def test_label_studio_csv_and_json_min_exports_are_labels_files(tmp_path, monkeypatch):
    images = tmp_path / "root" / "photos"
    for name in ("cat 1.png", "dog.png", "owl.png"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(images / name)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "root"))
    # Tasks Label Studio made itself from the storage: the image URL alone, URL-encoded.
    url = {
        n: LOCAL + "photos/" + n.replace(" ", "%20") for n in ("cat 1.png", "dog.png", "owl.png")
    }
    export = tmp_path / "export.csv"
    with export.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *STUDIO])
        w.writerow([url["cat 1.png"], 1, "cat", "1", 11, "2024-01-01", "2024-01-01", 2.5])
        w.writerow([url["dog.png"], 2, "dog", "1", 12, "2024-01-01", "2024-01-01", 1.0])
        w.writerow([url["owl.png"], 3, "", "1", "", "", "", ""])  # not labelled yet
    labels = read_labels_file(export)
    assert [(r.path, r.label) for r in labels.rows] == [
        (str(images / "cat 1.png"), "cat"),
        (str(images / "dog.png"), "dog"),
    ]
    assert labels.unlabelled == 1 and all(Path(r.path).is_file() for r in labels.rows)
    # JSON_MIN: flat records, the class under the Choices tag's name.
    records = [
        {"image": url["dog.png"], "id": 2, "choice": "dog", "annotator": 1, "annotation_id": 5},
        {"image": url["owl.png"], "id": 3, "choice": {"choices": ["owl"]}, "annotation_id": 6},
    ]
    (tmp_path / "min.json").write_text(json.dumps(records))
    rows = read_labels_file(tmp_path / "min.json").rows
    assert [(Path(r.path).name, r.label) for r in rows] == [("dog.png", "dog"), ("owl.png", "owl")]
    # Any other CSV names its columns.
    plain = tmp_path / "plain.csv"
    plain.write_text("file,class\nphotos/dog.png,dog\n")
    rows = read_labels_file(plain, columns=["file", "class"]).rows
    assert [(r.path, r.label) for r in rows] == [("photos/dog.png", "dog")]
    with pytest.raises(UserError, match="or name its columns with data.labels_columns"):
        read_labels_file(plain)
    with pytest.raises(UserError, match="no column klass"):
        read_labels_file(plain, columns=["file", "klass"])


@pytest.mark.parametrize(
    "row, words",
    [
        (["/data/upload/1/abc-dog.png", "dog"], "lives in Label Studio or on the web"),
        ([LOCAL + "photos/dog.png", '{"choices": ["dog", "cat"]}'], "has 2 classes (dog, cat)"),
    ],
)
def test_what_paws_cannot_read_from_an_export_is_one_line(
    tmp_path, capsys, monkeypatch, row, words
):
    export = tmp_path / "export.csv"
    with export.open("w", newline="") as f:
        csv.writer(f).writerows([["image", *STUDIO], [row[0], 1, row[1], 1, 1, "", "", 1.0]])
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "dog.png")
    settings = ["data.dataset=folder", f"data.unlabeled={folder}", f"data.labels_file={export}"]
    argv = ["--quiet", "train", "--out", str(tmp_path / "run"), *set_args(settings)]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2 and words in error_line(err)


def test_images_in_memory_are_written_for_label_studio_to_serve(tmp_path):
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (3, 3, 10, 10), dtype=np.uint8))
    images = ImageSet(np.full(3, -1), ["extra/0", "extra/1", "extra/2"], images=pixels)
    pool = Pool(images, np.zeros(3, dtype=bool), loading=None, builtin=True)
    picks = [Suggestion(2, "b", 0.75, "coverage"), Suggestion(0, "a", 0.5, "coverage")]
    files = write_tasks(
        Suggestions(pool, picks, "coverage", "pixels", ["a", "b"]), tmp_path / "t.json"
    )
    tasks = json.loads(files.tasks.read_text())
    assert [t["data"]["paws_path"] for t in tasks] == ["extra/2", "extra/0"]  # names read back
    for task, p in zip(tasks, picks):
        png = files.document_root / unquote(task["data"]["image"][len(LOCAL) :])
        assert png.parent == files.storage and png.parent.name == "t-images"
        assert np.array_equal(np.asarray(Image.open(png)), pixels[p.index].permute(1, 2, 0).numpy())
    assert files.storage.parent == files.document_root  # a storage path below the root
