"""``paws suggest`` (labelling/suggest.py): the images to label next, from a run or from none,
written as a CSV that trains the next round, and the candidates' embeddings in memory or on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import (
    clusters,
    error_line,
    read_rows,
    run_cli,
    set_args,
    tiny_overrides,
    train_tiny,
    write_fashion,
    write_rows,
)

from paws.config import load_config
from paws.data import load_datasets
from paws.labelling import suggest
from paws.labelling.strategies import (
    MemmapSource,
    TensorSource,
)
from paws.rundir import checkpoint


def fill_from_folder_names(suggested: Path, out: Path) -> Path:
    """The label column filled with each image's class folder, as a person would."""
    rows = read_rows(suggested)
    for r in rows:
        r["label"] = Path(r["path"]).parent.name
    return write_rows(out, list(rows[0]), [list(r.values()) for r in rows])


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
    # A labelled class with PAWS-NN's confidence, or a group of images of no labelled class
    # (classes 4 and 5 of the unlabelled folder are nobody's).
    known = [r for r in rows if r["suggested_label"] in classes]
    new = [r for r in rows if r["suggested_label"].startswith("new:")]
    assert len(known) + len(new) == 7
    assert all(0 < float(r["confidence"]) <= 1 for r in known)
    assert all(r["reason"] == "coverage" for r in known)  # the default strategy
    assert all(r["confidence"] == "" and r["reason"].endswith("; coverage") for r in new)
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
    # Excel's "Unicode text" (UTF-16, tabs) with a label filled in is read as such.
    out.write_bytes("path\tlabel\na.png\tcat\n".encode("utf-16"))
    code, _, err = run_cli(["suggest", str(run), "-n", "2", "--out", str(out)], capsys, monkeypatch)
    assert code == 2 and "already holds 1 labels" in error_line(err)
    # A file that is not a suggestion file is someone's: left as it is.
    for data in (b"notes", "x".encode("utf-16"), b"\xff\xfe\x00\xd8", b"\xe9t\xe9,label\n"):
        out.write_bytes(data)
        code, _, err = run_cli(
            ["suggest", str(run), "-n", "2", "--out", str(out)], capsys, monkeypatch
        )
        assert code == 2 and out.read_bytes() == data
        assert "already exists and is not a suggestion file" in error_line(err)
    # One paws wrote, still to fill in, is replaced by the new suggestions.
    write_rows(out, ["path", "label", "suggested_label"], [["a.png", "", "cat"]])
    code, _, err = run_cli(["suggest", str(run), "-n", "2", "--out", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert len(read_rows(out)) == 2


# --------------------------------------------------------------------------------------------
# Embedding the candidates.


def test_many_embeddings_are_written_to_a_float16_file_chunk_by_chunk(pool, tmp_path):
    from paws.data import ImageSet
    from paws.data.loaders import Loading
    from paws.labelling.strategies import TensorSource
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


@pytest.mark.parametrize("strategy", ["coverage", "mixed", "kcenter", "uncertainty", "random"])
def test_asking_for_more_than_are_left_gives_every_one_without_a_search(strategy, monkeypatch):
    from paws.labelling import suggest

    x, which = clusters(4, 25, seed=6)
    exclude = which == 2
    margin = torch.rand(len(x)).numpy()
    for slow in ("kmeans_select", "k_center_greedy", "mixed_select"):  # none may run
        monkeypatch.setattr(suggest, slow, lambda *a, **k: pytest.fail("searched"))
    rows, reasons = suggest.choose(
        strategy, TensorSource(x), 10_000, None, exclude, margin, which, seed=0
    )
    assert sorted(rows.tolist()) == np.flatnonzero(~exclude).tolist()
    assert (np.diff(margin[rows]) >= 0).all()  # the least sure first
    assert set(reasons) == {"every candidate not labelled yet"}


def test_candidates_of_no_labelled_class_are_grouped_as_new_classes():
    from paws.labelling.new_classes import new_class_groups
    from paws.labelling.strategies import TensorSource
    from paws.method.known_score import KnownScore

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:4] * 10  # classes 0 and 1 labelled; 2 and 3 nobody's
    labelled = torch.cat([centres[c] + torch.randn(5, 16, generator=g) for c in (0, 1)])
    labels = torch.tensor([0] * 5 + [1] * 5)
    sizes = (60, 60, 40, 20)  # the larger unlabelled class is new:1
    truth = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    pool = torch.cat([centres[c] + torch.randn(n, 16, generator=g) for c, n in enumerate(sizes)])
    exclude = np.zeros(len(pool), dtype=bool)
    exclude[-1] = True  # labelled already: never new
    for kind in ("diffusion", "soft"):
        known = KnownScore(kind=kind, neighbours=5)
        new = new_class_groups(TensorSource(pool), labelled, labels, known, 2, exclude)
        group = torch.from_numpy(new.group)
        assert (group[truth < 2] == 0).float().mean() > 0.9  # known classes stay known
        assert (group[truth == 2] == 1).all() and (group[:-1][truth[:-1] == 3] == 2).all()
        assert group[-1] == 0 and set(new.sizes) == {1, 2}
        assert all(new.sizes[k] == int((group == k).sum()) for k in (1, 2))
        assert (new.scores[new.group > 0] < new.threshold).all()


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
