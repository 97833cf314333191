"""Datasets in their real on-disk formats (built small and synthetic), subsets and batches;
mistakes in the data (missing or empty folders, unreadable, 16-bit or oversized images, crafted
CIFAR batches) through the paws command, each in one line."""

from __future__ import annotations

import csv
import gzip
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import (
    DISK,
    Cases,
    bomb_png,
    error_line,
    expect_error,
    paws_train,
    run_cli,
    text_as_jpeg,
    tiny_config,
    tiny_overrides,
    truncated_jpeg,
    write_fashion,
    write_folder,
)

from paws.config import load_config
from paws.data import (
    ImageSet,
    load_cifar,
    load_datasets,
    load_fashion_mnist,
    read_image,
    select_labeled,
)
from paws.data.loaders import Loading, multicrop_batches
from paws.errors import UserError


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": [int(i % 10) for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


def write_cifar100(root: Path, n: int = 200) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": [int(i % 100) for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    return root


def test_fashion_mnist_idx_files(tmp_path):
    write_fashion(tmp_path)
    train, test = load_fashion_mnist(str(tmp_path))
    assert train.images.shape == (60, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 1, 28, 28)
    assert list(train.labels[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    cfg = load_config(None, [f"data.root={tmp_path}", "data.labels_per_class=3"])
    data = load_datasets(cfg)
    assert len(data.labeled) == 30 and len(data.unlabeled) == 60  # labelled ones included
    assert np.bincount(data.labeled.labels).tolist() == [3] * 10
    assert np.all(data.unlabeled.labels == -1)
    assert data.channels == 1 and len(data.mean) == 1


def test_truncated_idx_file_is_a_user_error(tmp_path):
    write_fashion(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_fashion_mnist(str(tmp_path))


def test_cifar10_batches(tmp_path):
    write_cifar10(tmp_path)
    train, test, classes = load_cifar(str(tmp_path), "cifar10")
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert classes == [f"c{i}" for i in range(10)]
    cfg = load_config("cifar10_wrn28_2", [f"data.root={tmp_path}", "data.labels_per_class=2"])
    data = load_datasets(cfg)
    assert len(data.labeled) == 20 and data.channels == 3 and len(data.mean) == 3


def test_cifar100_batches(tmp_path):
    write_cifar100(tmp_path)
    train, test, classes = load_cifar(str(tmp_path / "cifar-100-python"), "cifar100")
    assert len(train) == 200 and len(classes) == 100 and train.labels.max() == 99


def test_cifar_loader_refuses_pickled_code(tmp_path):
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(UserError, match="refusing"):
        load_cifar(str(tmp_path), "cifar10")


def test_cifar_split_file_of_indices(tmp_path):
    write_cifar10(tmp_path)
    split = tmp_path / "split.txt"
    split.write_text("3\n17\n42\n")
    cfg = load_config(
        "cifar10_wrn28_2",
        [f"data.root={tmp_path}", f"data.split_file={split}"],
    )
    data = load_datasets(cfg)
    assert data.labeled.names == ["3", "17", "42"]


def test_imagenet_style_folders_with_split_file(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            d = tmp_path / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(d / f"{wnid}_{i}.JPEG")
    split_file = tmp_path / "1percent.txt"
    split_file.write_text("n01440764_0.JPEG\nn01443537_3.JPEG\n")
    cfg = load_config(
        "imagenet_resnet50_1pct",
        [f"data.root={tmp_path}", f"data.split_file={split_file}", "data.workers=0"],
    )
    data = load_datasets(cfg)
    assert not data.unlabeled.in_memory
    assert len(data.unlabeled) == 8 and len(data.labeled) == 2 and len(data.test) == 4
    assert data.classes == ["n01440764", "n01443537"]
    assert sorted(data.labeled.labels.tolist()) == [0, 1]


def test_split_file_naming_missing_images(tmp_path):
    write_fashion(tmp_path)
    split = tmp_path / "split.txt"
    split.write_text("1\n99999\n")
    cfg = load_config(None, [f"data.root={tmp_path}", f"data.split_file={split}"])
    with pytest.raises(UserError, match="99999"):
        load_datasets(cfg)


def test_label_fraction_and_labels_per_class():
    labels = np.repeat(np.arange(4), 50)
    images = ImageSet(labels=labels, names=[str(i) for i in range(200)])
    cfg = load_config(None, ["data.label_fraction=0.1"]).data
    chosen = select_labeled(images, cfg, 4)
    assert np.bincount(labels[chosen]).tolist() == [5, 5, 5, 5]
    cfg = load_config(None, ["data.labels_per_class=7", "data.split_seed=3"]).data
    a, b = select_labeled(images, cfg, 4), select_labeled(images, cfg, 4)
    assert np.array_equal(a, b) and np.bincount(labels[a]).tolist() == [7] * 4
    cfg2 = load_config(None, ["data.labels_per_class=7", "data.split_seed=4"]).data
    assert not np.array_equal(a, select_labeled(images, cfg2, 4))


def test_folder_of_mixed_image_modes_is_decoded_into_memory(tmp_path):
    labeled = tmp_path / "labeled"
    (labeled / "cat").mkdir(parents=True)
    (labeled / "dog").mkdir(parents=True)
    Image.new("L", (20, 31), 128).save(labeled / "cat" / "grey.png")
    Image.new("RGBA", (50, 40), (255, 0, 0, 128)).save(labeled / "cat" / "alpha.png")
    Image.new("P", (17, 17), 3).save(labeled / "dog" / "palette.gif")
    Image.new("RGB", (64, 48), (0, 0, 255)).save(labeled / "dog" / "rgb.jpg")
    (labeled / "dog" / "notes.txt").write_text("not an image, ignored")
    cfg = load_config(None, tiny_overrides({"labeled": labeled}))
    data = load_datasets(cfg)
    assert data.classes == ["cat", "dog"]
    assert data.channels == 3
    assert data.labeled.images.shape == (4, 3, 14, 14)  # 12 * 8/7 rounded
    assert len(data.unlabeled) == 4 and data.test is None
    # the half-transparent red is composited on white: pinkish, not dark
    alpha = data.labeled.images[data.labeled.names.index("cat/alpha.png")]
    assert alpha[0].float().mean() > 250 and alpha[1].float().mean() > 100


def test_grey_folder_gets_one_channel(image_folders):
    cfg = load_config(None, tiny_overrides(image_folders))
    data = load_datasets(cfg)
    assert data.channels == 1
    assert len(data.unlabeled) == 24 + 12  # nested unlabelled folder + the labelled images
    assert len(data.labeled) == 12 and len(data.test) == 12
    assert data.unlabeled.images.dtype == torch.uint8


def test_read_image_names_bad_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        read_image(bad)


def test_test_folder_with_unknown_class(tmp_path):
    labeled = write_folder(tmp_path / "labeled", classes=2, per_class=2)
    test = write_folder(tmp_path / "test", classes=2, per_class=2, names=["class0", "zebra"])
    cfg = load_config(None, tiny_overrides({"labeled": labeled, "test": test}))
    with pytest.raises(UserError, match="zebra"):
        load_datasets(cfg)


def _views(data, cfg, index_fn, workers):
    cfg.data.workers = workers
    out = []
    loading = Loading.of(cfg, data)
    for step, views, _ in multicrop_batches(
        data.unlabeled, index_fn, range(2, 4), cfg.views, loading, 0, 0, torch.device("cpu")
    ):
        out.append((step, views))
    return out


def test_views_are_a_function_of_the_step_in_memory_and_on_disk(image_folders):
    index_fn = lambda step: np.arange(step, step + 4)  # noqa: E731
    seen = {}
    for in_memory in ("true", "false"):
        cfg = load_config(None, tiny_overrides(image_folders, f"data.in_memory={in_memory}"))
        data = load_datasets(cfg)
        assert data.unlabeled.in_memory == (in_memory == "true")
        a = _views(data, cfg, index_fn, 0)
        b = _views(data, cfg, index_fn, 0)
        assert [s for s, _ in a] == [2, 3]
        assert len(a[0][1]) == 2 + cfg.views.small_crops
        assert a[0][1][0].shape == (4, 1, 12, 12) and a[0][1][2].shape == (4, 1, 8, 8)
        for (_, va), (_, vb) in zip(a, b):
            assert all(torch.equal(x, y) for x, y in zip(va, vb))
        assert not torch.equal(a[0][1][0], a[1][1][0])
        if in_memory == "false":  # the number of worker processes does not change the views
            c = _views(data, cfg, index_fn, 2)
            assert all(torch.equal(x, y) for x, y in zip(a[1][1], c[1][1]))
        seen[in_memory] = a
    # Decoded from disk as a folder held in memory is, then augmented the same way: the same
    # pixels whichever way the images are held.
    for (_, va), (_, vb) in zip(seen["true"], seen["false"]):
        assert all(torch.equal(x, y) for x, y in zip(va, vb))


def test_large_images_on_disk_are_cropped_per_image_from_the_full_file(image_folders):
    index_fn = lambda step: np.arange(step, step + 4)  # noqa: E731
    base = tiny_overrides(image_folders, "data.in_memory=false")
    cfg = load_config(None, base)
    assert Loading.of(cfg, load_datasets(cfg)).size is not None  # small images: batched
    per = load_config(None, [*base, "data.disk_views=per_image"])
    data = load_datasets(per)
    assert Loading.of(per, data).size is None
    a, b = _views(data, per, index_fn, 0), _views(data, per, index_fn, 2)
    assert [s for s, _ in a] == [2, 3] and a[0][1][0].shape == (4, 1, 12, 12)
    for (_, va), (_, vb) in zip(a, b):  # a function of the step, whatever the workers
        assert all(torch.equal(x, y) for x, y in zip(va, vb))
    batched = _views(data, cfg, index_fn, 0)
    assert not torch.equal(a[0][1][0], batched[0][1][0])  # another augmentation
    large = load_config(None, [*base, "views.large_size=64", "views.small_size=32"])
    assert Loading.of(large, data).size is None  # large images: per image by default


def test_num_labels_draws_uniformly_from_the_whole_set_with_uneven_counts():
    labels = np.repeat(np.arange(10), 100)
    images = ImageSet(labels=labels, names=[str(i) for i in range(1000)])
    cfg = load_config(None, ["data.num_labels=100", "data.split_seed=3"]).data
    chosen = select_labeled(images, cfg, 10)
    assert len(chosen) == len(np.unique(chosen)) == 100
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts.sum() == 100 and counts.min() != counts.max()  # not 10 of each
    again = select_labeled(images, cfg, 10)
    assert np.array_equal(chosen, again)  # a function of split_seed
    other = load_config(None, ["data.num_labels=100", "data.split_seed=4"]).data
    assert not np.array_equal(chosen, select_labeled(images, other, 10))
    with pytest.raises(UserError, match="num_labels is 2000"):
        select_labeled(images, load_config(None, ["data.num_labels=2000"]).data, 10)


# --------------------------------------------------------------------------------------------
# Mistakes in the data, through the paws command: one line each.


def test_missing_data_folder(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path / "nowhere")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == f"labelled folder not found: {tmp_path / 'nowhere'}"


def test_empty_data_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, tiny_config(tmp_path / "empty")))
    assert line == (
        f"{tmp_path / 'empty'} has no class sub-folders: arrange labelled images as <class>/<image>"
    )


def test_empty_unlabelled_folder(folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "unl").mkdir()
    cfg = tiny_config(folder, f"data.unlabeled={tmp_path / 'unl'}")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line.startswith(f"no images found in {tmp_path / 'unl'} (looked for .jpg, .jpeg,")


def test_empty_class_folder(folder, tmp_path, capsys, monkeypatch):
    (folder / "emu").mkdir()
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, tiny_config(folder)))
    assert line == f"class folder {folder / 'emu'} holds no images; add images or remove the folder"


@pytest.mark.parametrize("storage", ["memory", "disk"])
@pytest.mark.parametrize("bad", [truncated_jpeg, text_as_jpeg], ids=["truncated", "text"])
def test_unreadable_image_names_the_file(bad, storage, folder, tmp_path, capsys, monkeypatch):
    # On disk the file is read in a data-loader worker process, which wraps the error.
    path = bad(folder)
    cfg = tiny_config(folder, *(DISK if storage == "disk" else []))
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line.startswith(f"cannot read image {path}: ")
    assert line.endswith("; fix or remove it, or set data.on_bad_image: skip")


def test_a_split_file_naming_missing_images_of_a_folder_is_one_line(
    folder, tmp_path, capsys, monkeypatch
):
    split = tmp_path / "split.txt"
    split.write_text("cat_0.png\ndog_1.png\nfox_9.png\n")
    line = expect_error(
        paws_train(tmp_path, capsys, monkeypatch, tiny_config(folder, f"data.split_file={split}"))
    )
    assert line == (
        f"split file {split} names 1 image(s) not in the dataset, e.g. 'fox_9.png'; fix the "
        "names or the data folder"
    )


def _cifar10_folder(root: Path, batch: bytes | None = None) -> Path:
    """A CIFAR-10 python-batch folder with 2 images per file (as Python 3 pickles them)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = {"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(batch or pickle.dumps(data, protocol=2))
    meta = {"label_names": ["airplane", "automobile"]}
    (folder / "batches.meta").write_bytes(batch or pickle.dumps(meta, protocol=2))
    return root


def test_cifar_batches_load_with_the_restricted_unpickler(tmp_path):
    train, test, classes = load_cifar(str(_cifar10_folder(tmp_path)), "cifar10")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert classes == ["airplane", "automobile"] and train.labels.tolist() == [0, 1] * 5


def test_cifar_batch_that_runs_code_is_refused(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    root = _cifar10_folder(tmp_path / "cifar")
    evil = root / "cifar-10-batches-py" / "data_batch_3"
    evil.write_bytes(pickle.dumps({"data": _Shell(f"touch {marker}"), "labels": [0]}))
    cfg = {"data": {"dataset": "cifar10", "root": str(root)}, "run": {"device": "cpu"}}
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == f"cannot read CIFAR batch {evil}: refusing to load {os.system.__module__}.system"
    assert not marker.exists()


class _Shell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# --------------------------------------------------------------------------------------------
# Damaged inputs, generated systematically (tiny.Cases).


def _cifar(root: Path, data: Any, labels: Any) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": data, "labels": labels} if name == "data_batch_3" else good
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=2))
    return root


CIFAR_DAMAGE = {
    "rows of 3000 values": (np.zeros((2, 3000), np.uint8), [0, 1]),
    "a flat array": (np.zeros(6144, np.uint8), [0, 1]),
    "float data": (np.full((2, 3072), 0.5), [0, 1]),
    "int64 data": (np.zeros((2, 3072), np.int64), [0, 1]),
    "a list as data": ([[0] * 3072] * 2, [0, 1]),
    "a label out of range": (np.zeros((2, 3072), np.uint8), [0, 2]),
    "a negative label": (np.zeros((2, 3072), np.uint8), [0, -1]),
    "more labels than images": (np.zeros((2, 3072), np.uint8), [0, 1, 1]),
    "fewer labels than images": (np.zeros((2, 3072), np.uint8), [0]),
    "float labels": (np.zeros((2, 3072), np.uint8), [0.5, 1.0]),
    "text labels": (np.zeros((2, 3072), np.uint8), ["a", "b"]),
}


def test_crafted_cifar_batches(tmp_path, capsys):
    cases = Cases(capsys)
    for i, (name, (data, labels)) in enumerate(CIFAR_DAMAGE.items()):
        root = _cifar(tmp_path / f"c{i}", data, labels)
        argv = [
            "train",
            "--config",
            "cifar10_wrn28_2",
            "--set",
            f"data.root={root}",
            "--set",
            "run.device=cpu",
            "--out",
            str(tmp_path / f"run{i}"),
        ]
        cases.refused(name, argv, root, "data_batch_3")
    cases.check()


def test_a_16_bit_image_embeds_as_its_8_bit_equivalent(made, tmp_path, capsys):
    grey = np.asarray(Image.open(made["image"]).convert("L"))
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    for name in ("eight", "sixteen"):
        argv = [
            "--quiet",
            "embed",
            str(made["export"]),
            str(tmp_path / f"{name}.png"),
            "--out",
            str(tmp_path / f"{name}.npy"),
        ]
        code, _, err = run_cli(argv, capsys, None)
        assert code == 0, err
    eight, sixteen = (np.load(tmp_path / f"{n}.npy") for n in ("eight", "sixteen"))
    assert np.allclose(eight, sixteen, atol=1e-6)
    # Pillow's own conversion would read it as nearly white: a different embedding.
    Image.fromarray(np.full_like(grey, 255)).save(tmp_path / "white.png")
    argv = [
        "--quiet",
        "embed",
        str(made["export"]),
        str(tmp_path / "white.png"),
        "--out",
        str(tmp_path / "white.npy"),
    ]
    assert run_cli(argv, capsys, None)[0] == 0
    assert not np.allclose(eight, np.load(tmp_path / "white.npy"), atol=1e-3)


def test_decompression_bombs_are_bad_images_in_every_command(made, tmp_path, capsys):
    bomb = bomb_png(tmp_path / "bomb.png")
    big = bomb_png(tmp_path / "big.png", 12_000, 12_000)  # below Pillow's own limit
    for path in (bomb, big):
        argv = ["--quiet", "predict", str(made["export"]), str(path)]
        line = error_line(run_cli(argv, capsys, None)[2])
        assert line.startswith(f"cannot read image {path}: it claims ")
        assert "more than data.max_image_pixels (89,478,485)" in line
    # Skipped, the other images are predicted; a lower limit makes a small image a bad one.
    argv = [
        "--quiet",
        "predict",
        str(made["export"]),
        str(bomb),
        str(made["image"]),
        "--set",
        "data.on_bad_image=skip",
    ]
    code, out, err = run_cli(argv, capsys, None)
    assert code == 0, err
    assert [r["file"] for r in csv.DictReader(out.splitlines())] == [str(made["image"])]
    argv = [
        "--quiet",
        "embed",
        str(made["run"]),
        str(made["image"]),
        "--out",
        str(tmp_path / "e.npy"),
        "--set",
        "data.max_image_pixels=100",
    ]
    assert "more than data.max_image_pixels (100)" in error_line(run_cli(argv, capsys, None)[2])


def test_a_bare_name_in_a_split_file_that_several_images_share_is_refused(tmp_path):
    lab = write_folder(tmp_path / "lab", 2, 2, seed=1, names=["cat", "dog"])
    for cls in ("cat", "dog"):  # one file name in both class folders
        (lab / cls / f"{cls}_0.png").rename(lab / cls / "a.png")
    split = tmp_path / "split.txt"
    split.write_text("cat_1.png\na.png\n")
    cfg = load_config(None, [*tiny_overrides({"labeled": lab}), f"data.split_file={split}"])
    with pytest.raises(UserError, match=r"split file .*split.txt: 'a.png' names 2 images"):
        load_datasets(cfg)
    split.write_text("cat_1.png\ndog/a.png\n")  # a path says which
    data = load_datasets(cfg)
    assert sorted(data.labeled.names) == ["cat/cat_1.png", "dog/a.png"]
