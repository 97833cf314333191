"""The labelling loop: ``paws suggest``, labels as a CSV (``data.labels_file``), uneven label
counts, and ``paws train --init`` rounds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_fashion
from tiny import error_line, run_cli, set_args, tiny_overrides, train_tiny, write_folder

from paws.config import load_config
from paws.data import load_datasets
from paws.labelling import suggest
from paws.rundir import checkpoint


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def fill_from_folder_names(suggested: Path, out: Path) -> Path:
    """The label column filled with each image's class folder, as a person would."""
    rows = read_rows(suggested)
    for r in rows:
        r["label"] = Path(r["path"]).parent.name
    return write_rows(out, list(rows[0]), [list(r.values()) for r in rows])


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    """An unlabelled folder of classes 0-2 (8 each), a labelled one (3 each), a test one."""
    return {
        "unlabeled": write_folder(tmp_path / "unl", 3, 8, seed=2),
        "labeled": write_folder(tmp_path / "lab", 3, 3, seed=1),
        "test": write_folder(tmp_path / "test", 3, 3, seed=3),
    }


def labels_config(pool: dict[str, Path], labels: Path, *changes: str):
    folders = {k: pool[k] for k in ("unlabeled", "test")}
    return load_config(None, [*tiny_overrides(folders), f"data.labels_file={labels}", *changes])


# --------------------------------------------------------------------------------------------
# paws suggest, end to end.


def test_suggest_writes_the_csv_and_a_contact_sheet_and_round_trips_into_training(
    shared_run, tmp_path, capsys, monkeypatch
):
    paths, run = shared_run
    out, sheet = tmp_path / "next.csv", tmp_path / "next.html"
    argv = ["--quiet", "suggest", str(run), "-n", "7", "--out", str(out), "--html", str(sheet)]
    code, stdout, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "label", "suggested_label", "confidence", "reason"]
    assert len(rows) == 7 and all(r["label"] == "" for r in rows)
    classes = {f"class{c}" for c in range(4)}  # the run's labelled classes
    assert all(r["suggested_label"] in classes for r in rows)
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)
    assert all(r["reason"] == "coverage" for r in rows)  # the default strategy
    files = [(tmp_path / r["path"]).resolve() for r in rows]
    labelled = {f.resolve() for f in paths["labeled"].rglob("*.png")}
    assert all(f.is_file() and f not in labelled for f in files)
    assert len(set(files)) == 7
    page = sheet.read_text()
    assert page.count("data:image/png;base64,") == 7
    assert all(Path(r["path"]).name in page for r in rows)
    # Filled in, the file is the labelled set of a new run.
    labels = fill_from_folder_names(out, tmp_path / "labels.csv")
    folders = {"unlabeled": paths["unlabeled"], "test": paths["test"]}
    overrides = [*tiny_overrides(folders), f"data.labels_file={labels}", "support.classes=null"]
    cfg = load_config(None, overrides)
    data = load_datasets(cfg)
    assert sorted(data.labeled.names) == sorted(r["path"] for r in rows)  # those images alone
    truth = dict(zip((r["path"] for r in rows), (Path(r["path"]).parent.name for r in rows)))
    assert {n: data.classes[y] for n, y in zip(data.labeled.names, data.labeled.labels)} == truth
    result = train_tiny(tmp_path / "round2", overrides)
    assert json.loads((result / "eval.json").read_text())["num_support"] == 7


def test_suggest_never_suggests_labelled_images(shared_run, tmp_path, capsys, monkeypatch):
    paths, run = shared_run
    # The candidates include every labelled image: ask for more images than are unlabelled.
    data = paths["labeled"].parent
    out = tmp_path / "all.csv"
    argv = ["--quiet", "suggest", str(run), "--unlabeled", str(data), "-n", "1000"]
    code, _, err = run_cli(
        [*argv, "--out", str(out), "--strategy", "coverage"], capsys, monkeypatch
    )
    assert code == 0, err
    chosen = [(tmp_path / r["path"]).resolve() for r in read_rows(out)]
    labelled = {f.resolve() for f in paths["labeled"].rglob("*.png")}
    every = {f.resolve() for f in data.rglob("*.png")}
    assert len(labelled) == 32 and labelled < every
    assert len(chosen) == len(set(chosen)) and set(chosen) == every - labelled


@pytest.mark.parametrize("space", ["trunk", "head"])
def test_coverage_chooses_in_the_space_asked_for(shared_run, space, monkeypatch):
    _, run = shared_run
    made, chosen_in = {}, []
    embed, choose = suggest.embed_pool, suggest.choose

    def spy_embed(net, images, cfg, loading, device, features, *a, **k):
        out = embed(net, images, cfg, loading, device, features, *a, **k)
        made[id(out)] = features
        return out

    def spy_choose(strategy, source, *a, **k):
        chosen_in.append(made[id(source)])
        return choose(strategy, source, *a, **k)

    monkeypatch.setattr(suggest, "embed_pool", spy_embed)
    monkeypatch.setattr(suggest, "choose", spy_choose)
    s = suggest.suggest_from_run(run, 3, "coverage", progress=False, space=space)
    assert chosen_in == [space] and s.features == f"the run's {space} embedding"
    assert len(s.picks) == 3 and all(p.suggested is not None for p in s.picks)


def test_cold_start_suggests_from_a_folder_with_no_run(pool, tmp_path, capsys, monkeypatch):
    out = tmp_path / "first.csv"
    argv = ["--quiet", "suggest", "--unlabeled", str(pool["unlabeled"]), "-n", "3"]
    code, _, err = run_cli(
        [*argv, "--out", str(out), "--set", "views.large_size=12"], capsys, monkeypatch
    )
    assert code == 0, err
    rows = read_rows(out)
    assert [r["suggested_label"] for r in rows] == ["", "", ""]
    assert {Path(r["path"]).parent.name for r in rows} == {"class0", "class1", "class2"}


def test_cold_start_on_a_built_in_dataset_names_images_by_index(tmp_path, capsys, monkeypatch):
    write_fashion(tmp_path / "fm")
    out = tmp_path / "first.csv"
    argv = [
        "--quiet",
        "suggest",
        "-n",
        "5",
        "--out",
        str(out),
        "--set",
        f"data.root={tmp_path / 'fm'}",
    ]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    names = [r["path"] for r in read_rows(out)]
    assert len(set(names)) == 5 and all(0 <= int(n) < 60 for n in names)


def test_a_filled_suggestion_file_is_never_overwritten(shared_run, tmp_path, capsys, monkeypatch):
    _, run = shared_run
    out = write_rows(tmp_path / "next.csv", ["path", "label"], [["a.png", "cat"]])
    code, _, err = run_cli(["suggest", str(run), "-n", "2", "--out", str(out)], capsys, monkeypatch)
    assert code == 2
    assert "already holds 1 labels" in error_line(err)


# --------------------------------------------------------------------------------------------
# data.labels_file.


def test_labels_file_alongside_class_folders_with_a_new_class(pool, tmp_path):
    unl = pool["unlabeled"]
    labels = write_rows(
        tmp_path / "labels.csv",
        ["path", "label", "note"],
        [
            [str(unl / "class0" / "class0_5.png"), "class0", "x"],
            ["unl/class2/class2_1.png", "zebra", ""],
        ],
    )
    cfg = load_config(
        None,
        [*tiny_overrides(pool), f"data.labels_file={labels}"],
    )
    data = load_datasets(cfg)
    assert data.classes == ["class0", "class1", "class2", "zebra"]
    assert len(data.labeled) == 9 + 2
    named = dict(zip(data.labeled.names, data.labeled.labels))
    assert data.classes[named[str(unl / "class0" / "class0_5.png")]] == "class0"
    assert data.classes[named["unl/class2/class2_1.png"]] == "zebra"
    assert data.classes[named["class1/class1_0.png"]] == "class1"  # the folder's own


def test_unlabelled_suggestions_are_skipped_unless_accepted(pool, tmp_path):
    header = ["path", "label", "suggested_label", "confidence", "reason"]
    rows = [
        ["unl/class0/class0_0.png", "class0", "class0", "0.9", "coverage"],
        ["unl/class1/class1_0.png", "", "class1", "0.6", "uncertain (margin 0.10)"],
        ["unl/class2/class2_0.png", "class2", "class1", "0.5", "uncertain (margin 0.02)"],
    ]
    labels = write_rows(tmp_path / "next.csv", header, rows)
    skipped = load_datasets(labels_config(pool, labels))
    assert sorted(skipped.labeled.names) == ["unl/class0/class0_0.png", "unl/class2/class2_0.png"]
    accepted = load_datasets(labels_config(pool, labels, "data.accept_suggested=true"))
    assert len(accepted.labeled) == 3
    named = dict(zip(accepted.labeled.names, accepted.labeled.labels))
    assert accepted.classes[named["unl/class1/class1_0.png"]] == "class1"
    assert accepted.classes[named["unl/class2/class2_0.png"]] == "class2"  # the person's label


def test_labels_file_of_a_built_in_dataset_names_training_images(tmp_path):
    write_fashion(tmp_path / "fm")
    labels = write_rows(
        tmp_path / "labels.csv", ["path", "label"], [["7", "Sneaker"], ["3", "Dress"], ["12", "8"]]
    )
    cfg = load_config(None, [f"data.root={tmp_path / 'fm'}", f"data.labels_file={labels}"])
    data = load_datasets(cfg)
    assert data.labeled.names == ["3", "7", "12"]
    assert [data.classes[y] for y in data.labeled.labels] == ["Dress", "Sneaker", "Bag"]
    assert len(data.unlabeled) == 60  # the labelled images stay in the unlabelled set
    torch.testing.assert_close(data.labeled.images[1], data.unlabeled.images[7])


def bad_file(pool: dict[str, Path], tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A labels file with one thing wrong, and the extra settings of its run."""
    header = ["path", "label"]
    good = ["unl/class0/class0_0.png", "class0"]
    rows = {
        "unknown path": [good, ["unl/class0/nope.png", "class0"]],
        "empty label": [good, ["unl/class1/class1_0.png", ""]],
        "duplicate": [
            good,
            ["unl/class1/class1_0.png", "class1"],
            ["./unl/class0/class0_0.png", "class0"],
        ],
        "conflict": [good, ["unl/class0/class0_0.png", "class1"]],
        "conflict with a class folder": [["lab/class1/class1_2.png", "class0"]],
        "unknown class": [["5", "Sneakers"]],
        "unknown image name": [["60", "Bag"]],
    }[case]
    labels = write_rows(tmp_path / "labels.csv", header, rows)
    if case.startswith("unknown class") or case == "unknown image name":
        write_fashion(tmp_path / "fm")
        return labels, [f"data.root={tmp_path / 'fm'}", f"data.labels_file={labels}", *TINY_TRAIN]
    folders = pool if case == "conflict with a class folder" else {"unlabeled": pool["unlabeled"]}
    return labels, [*tiny_overrides(folders), f"data.labels_file={labels}"]


TINY_TRAIN = ["optim.steps=1", "run.device=cpu", "data.workers=0"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown path", "row 3 ('unl/class0/nope.png'): no such image file"),
        ("empty label", "row 3 ('unl/class1/class1_0.png'): the label is empty; fill it in"),
        (
            "duplicate",
            "row 4 ('./unl/class0/class0_0.png'): duplicate: row 2 labels the same image",
        ),
        (
            "conflict",
            "row 3 ('unl/class0/class0_0.png'): conflicting labels: 'class1' here, 'class0' on "
            "row 2 for the same image",
        ),
        (
            "conflict with a class folder",
            "row 2 ('lab/class1/class1_2.png'): conflicting labels: 'class0' here, 'class1' by "
            "its class folder",
        ),
        ("unknown class", "row 2 ('5'): 'Sneakers' is not a class of the dataset (T-shirt/top"),
        ("unknown image name", "row 2 ('60'): no image of that name in the training set"),
    ],
)
def test_a_bad_labels_file_is_one_line_naming_the_row(
    case, message, pool, tmp_path, capsys, monkeypatch
):
    labels, overrides = bad_file(pool, tmp_path, case)
    argv = ["--quiet", "train", "--out", str(tmp_path / "run"), *set_args(overrides)]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"labels file {labels} "), line
    assert message in line, line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_labels_file_with_classes_of_one_two_and_twenty_labels_trains(tmp_path):
    unl = write_folder(tmp_path / "unl", 4, 20, seed=5)
    counts = {0: 1, 1: 2, 2: 20, 3: 20}
    rows = [
        [f"unl/class{c}/class{c}_{i}.png", f"class{c}"] for c, n in counts.items() for i in range(n)
    ]
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    test = write_folder(tmp_path / "test", 4, 2, seed=6)
    overrides = [
        *tiny_overrides({"unlabeled": unl, "test": test}),
        f"data.labels_file={labels}",
        "support.classes=null",
        "support.images_per_class=5",
    ]
    run = train_tiny(tmp_path / "run", overrides)
    assert json.loads((run / "eval.json").read_text())["num_support"] == 43
    assert (run / "tighten.pt").is_file()
    assert load_config(run / "config.yaml").support.classes == 4


# --------------------------------------------------------------------------------------------
# paws train --init.


def test_init_starts_from_the_previous_run_weights(pool, tmp_path, capsys, monkeypatch):
    first = train_tiny(tmp_path / "r1", tiny_overrides(pool))
    # Learning rates of 0: the new run's parameters never move from where it started.
    still = [
        "optim.start_lr=0",
        "optim.ref_lr=0",
        "optim.final_lr=0",
        "tighten.after_training=false",
    ]
    argv = ["--quiet", "train", "--init", str(first), "--out", str(tmp_path / "r2")]
    code, _, err = run_cli([*argv, *set_args([*tiny_overrides(pool), *still])], capsys, monkeypatch)
    assert code == 0, err
    old = checkpoint.load(first / "last.pt")
    new = checkpoint.load(tmp_path / "r2" / "final.pt")
    params = [k for k, _ in checkpoint_params(new)]
    assert params and all(torch.equal(old["model"][k], new["model"][k]) for k in params)
    assert new["step"] == 4 and not torch.equal(
        old["model"][params[0]], fresh_weights(pool, tmp_path)[params[0]]
    )
    record = json.loads((tmp_path / "r2" / "init.json").read_text())
    assert Path(record["from"]) == first.resolve()
    assert Path(record["checkpoint"]) == (first / "last.pt").resolve()
    assert record["step"] == 4


def checkpoint_params(state: dict) -> list[tuple[str, torch.Tensor]]:
    """The trained parameters of a checkpoint (batch-norm statistics move without a step)."""
    return [
        (k, v) for k, v in state["model"].items() if v.is_floating_point() and "running_" not in k
    ]


def fresh_weights(pool: dict[str, Path], tmp_path: Path) -> dict[str, torch.Tensor]:
    """The weights a run without --init starts from (its seed's initialisation)."""
    from paws.models import Architecture
    from paws.pretrain.stages import training_model

    cfg = load_config(None, tiny_overrides(pool))
    arch = Architecture.from_config(cfg, 1)
    return training_model(cfg, arch, torch.device("cpu")).state_dict()


def test_init_keeps_the_schedule_short_and_takes_new_labels(pool, tmp_path):
    first = train_tiny(tmp_path / "r1", tiny_overrides(pool))
    labels = write_rows(
        tmp_path / "labels.csv", ["path", "label"], [["unl/class0/class0_1.png", "new class"]]
    )
    from paws.pretrain.train import train

    # 2 epochs of 33 images (24 + the 9 labelled) in batches of 8 are 8 steps, not min_steps.
    changes = [
        "optim.steps=null",
        "optim.epochs=2",
        f"data.labels_file={labels}",
        "support.classes=null",
    ]
    cfg = load_config(None, tiny_overrides(pool, *changes))
    result = train(cfg, tmp_path / "r2", init=first)
    assert result["step"] == 8
    saved = load_config(tmp_path / "r2" / "config.yaml")
    assert saved.optim.min_steps is None
    assert saved.data.labels_file == str(labels)


def test_init_of_another_architecture_is_one_line(pool, tmp_path, capsys, monkeypatch):
    first = train_tiny(tmp_path / "r1", tiny_overrides(pool))
    capsys.readouterr()  # the first run's progress
    argv = ["--quiet", "train", "--init", str(first), "--out", str(tmp_path / "r2")]
    overrides = tiny_overrides(pool, "model.proj_out=12")
    code, _, err = run_cli([*argv, *set_args(overrides)], capsys, monkeypatch)
    assert code == 2
    line = error_line(err)
    assert "its architecture differs (proj_out 8 -> 12)" in line, line
    assert not (tmp_path / "r2" / "last.pt").exists()


def test_unlabelled_rows_only_is_one_line(pool, tmp_path, capsys, monkeypatch):
    labels = write_rows(
        tmp_path / "next.csv",
        ["path", "label", "suggested_label", "confidence", "reason"],
        [["unl/class0/class0_0.png", "", "class0", "0.5", "coverage"]],
    )
    overrides = [*tiny_overrides({"unlabeled": pool["unlabeled"]}), f"data.labels_file={labels}"]
    argv = ["--quiet", "train", "--out", str(tmp_path / "run"), *set_args(overrides)]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    assert "labels no image (1 suggestions are still unlabelled)" in error_line(err)


def test_report_shows_the_rounds_of_a_labelling_loop_in_order(pool, tmp_path):
    pytest.importorskip("matplotlib")
    from paws.pretrain.train import train
    from paws.report import build_report

    folders = {"unlabeled": pool["unlabeled"], "test": pool["test"]}
    rounds, labels = [], []
    for i, per_class in enumerate((1, 2, 4)):
        rows = [
            [f"unl/class{c}/class{c}_{j}.png", f"class{c}"]
            for c in range(3)
            for j in range(per_class)
        ]
        labels.append(write_rows(tmp_path / f"labels{i}.csv", ["path", "label"], rows))
        cfg = load_config(None, tiny_overrides(folders, f"data.labels_file={labels[-1]}"))
        train(cfg, tmp_path / f"r{i + 1}", init=rounds[-1] if rounds else None)
        rounds.append(tmp_path / f"r{i + 1}")
    # Given out of order, the report puts them in round order.
    paths = build_report([rounds[2], rounds[0], rounds[1]], tmp_path / "rep", 0, 0)
    page = paths["html"].read_text()
    assert "<h2>Labelling rounds</h2>" in page
    table = page[page.index("<h2>Labelling rounds</h2>") :]
    table = table[: table.index("</table>")]
    cells = [row.split("<td>")[1:] for row in table.split("<tr>")[2:]]
    values = [[c.split("</td>")[0] for c in row] for row in cells]
    assert [v[:4] for v in values] == [
        ["1", "r1", "3", "3"],
        ["2", "r2", "6", "3"],
        ["3", "r3", "12", "3"],
    ]
    assert [v[6] for v in values] == ["scratch", "r1", "r2"]
    assert all(v[4].endswith("%") and float(v[5]) >= 0 for v in values)


def test_many_embeddings_are_written_to_a_float16_file_chunk_by_chunk(pool, tmp_path):
    from paws.data import ImageSet
    from paws.data.loaders import Loading
    from paws.labelling.strategies import MemmapSource, TensorSource
    from paws.labelling.suggest import PixelFeatures, embed_pool

    files = sorted(pool["unlabeled"].rglob("*.png"))
    names = [f.name for f in files]
    images = ImageSet(labels=-np.ones(len(files), dtype=np.int64), names=names, files=files)
    cfg = load_config(None, tiny_overrides(pool))
    args = (PixelFeatures(), images, cfg, Loading(1, (0.5,), (0.25,)), torch.device("cpu"), "head")
    in_memory = embed_pool(*args, progress=False)
    on_disk = embed_pool(*args, scratch=tmp_path, memory_rows=5, chunk=7, progress=False)
    assert isinstance(in_memory, TensorSource) and isinstance(on_disk, MemmapSource)
    assert on_disk.path.parent == tmp_path and len(on_disk) == 24 and on_disk.dim == 144
    torch.testing.assert_close(on_disk.rows(0, 24), in_memory.x, atol=1e-3, rtol=0)
    assert torch.allclose(in_memory.x.norm(dim=1), torch.ones(24))


# --------------------------------------------------------------------------------------------
# A label-free first round: paws train with no labels, paws suggest on it, --init from it.


def test_a_label_free_run_is_a_cold_start_for_suggest_and_starts_round_2(
    pool, tmp_path, capsys, monkeypatch
):
    free = tmp_path / "free"
    settings = ["data.dataset=folder", f"data.unlabeled={pool['unlabeled']}"]
    tiny = [o for o in tiny_overrides({}) if not o.startswith("data.dataset")]
    code, out, err = run_cli(
        ["--quiet", "train", "--out", str(free), *set_args([*settings, *tiny])], capsys, monkeypatch
    )
    assert code == 0, err
    assert "label-free" in out and not (free / "eval.json").exists()
    state = checkpoint.load(free / "final.pt")
    assert state["config"]["loss"]["objective"] == "simclr"
    assert state["config"]["views"]["small_crops"] == 0
    # paws suggest on it: a cold start in its embedding, TypiClust by default, no guesses.
    csv_out = tmp_path / "first.csv"
    code, _, err = run_cli(
        ["--quiet", "suggest", str(free), "-n", "4", "--out", str(csv_out)], capsys, monkeypatch
    )
    assert code == 0, err
    rows = read_rows(csv_out)
    assert len(rows) == 4 and len({r["path"] for r in rows}) == 4
    assert all(r["suggested_label"] == "" and "typical" in r["reason"] for r in rows)
    # Round 2 from its weights, with the labels of the images it suggested.
    labels = fill_from_folder_names(csv_out, tmp_path / "labels.csv")
    round2 = [*settings, *tiny, f"data.labels_file={labels}", "support.classes=null"]
    argv = ["--quiet", "train", "--init", str(free), "--out", str(tmp_path / "r2")]
    code, _, err = run_cli([*argv, *set_args(round2)], capsys, monkeypatch)
    assert code == 0, err
    record = json.loads((tmp_path / "r2" / "init.json").read_text())
    assert Path(record["checkpoint"]) == (free / "last.pt").resolve()
    assert checkpoint.load(tmp_path / "r2" / "final.pt")["config"]["loss"]["objective"] == "paws"
