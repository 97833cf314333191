"""Damaged inputs, generated systematically: every one ends in one line and exit status 2.

One tiny run and its export are made once for the module; each family of cases damages a copy
of one of their files in every way it lists (each top-level entry of a checkpoint and of an
export description replaced by each wrong type, and removed; tensors of the wrong shape or
dtype; files cut at several lengths; configs in other encodings; output paths that cannot be
written) and runs the ``paws`` command on it. Every case must exit with status 2, print exactly
one non-empty line on stderr (``paws: error: ...``) and no traceback, and leave the files of
the run or export as they were. A family collects every failing case before it fails, so that
one run shows them all. The tests at the end check the cases that once went silently wrong.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import (
    ANIMALS,
    RESUMABLE,
    error_line,
    run_cli,
    tiny_config,
    tiny_overrides,
    torch_state,
    train_tiny,
    write_config,
    write_folder,
)

from paws import cli
from paws.rundir.lock import LOCK, RunLock

# Values of every kind a damaged or hand-edited file may hold instead of the right one.
WRONG: dict[str, Any] = {
    "text": "oops",
    "int": 7,
    "float": 2.5,
    "bool": True,
    "list": [1, 2],
    "dict": {"x": 1},
    "tensor": torch.zeros(3),
    "none": None,
}
JSON_WRONG = {k: v for k, v in WRONG.items() if k != "tensor"}


class Cases:
    """Runs cases and collects those that do not end as a user error should."""

    def __init__(self, capsys: Any):
        self.capsys, self.failures, self.count = capsys, [], 0

    def refused(
        self, name: str, argv: list[str], watched: Path | list[Path], expect: str = ""
    ) -> None:
        """``paws --quiet ARGV`` must exit with 2 and one line (containing ``expect``),
        leaving every file below ``watched`` (one path or several) unchanged."""
        self.count += 1
        watched = watched if isinstance(watched, list) else [watched]
        before = [snapshot(w) for w in watched]
        with torch_state():
            code = cli.main(["--quiet", *argv])
        _, err = self.capsys.readouterr()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if code != 2 or len(lines) != 1 or "Traceback" in err:
            self.failures.append(f"{name}: exit {code}, stderr: {err.strip()[-400:]}")
        elif not lines[0].startswith("paws: error: ") or expect not in lines[0]:
            self.failures.append(f"{name}: {lines[0]}")
        elif [snapshot(w) for w in watched] != before:
            self.failures.append(f"{name}: changed the files of {watched}")

    def check(self) -> None:
        """Fail with every case that did not end as it should."""
        assert not self.failures, f"{len(self.failures)} of {self.count} cases:\n" + "\n".join(
            self.failures
        )


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (or ``root`` itself) with its content."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny run with a test set (4 steps), its export and a query image, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    labeled = write_folder(root / "labeled", names=ANIMALS, channels=3)
    test = write_folder(root / "test", names=ANIMALS, channels=3, per_class=2, seed=3)
    settings = [*RESUMABLE, "optim.steps=4", "run.checkpoint_every=4"]
    run = train_tiny(root / "run", tiny_overrides({"labeled": labeled, "test": test}, *settings))
    with torch_state():
        assert cli.main(["--quiet", "export", str(run), "--out", str(root / "export")]) == 0
    config = write_config(root / "cfg.yaml", tiny_config(labeled, "optim.steps=2"))
    return {
        "root": root,
        "labeled": labeled,
        "test": test,
        "run": run,
        "export": root / "export",
        "config": config,
        "image": test / "cat" / "cat_0.png",
    }


def copy_run(made: dict[str, Path], dest: Path) -> Path:
    """A copy of the module's run directory."""
    return Path(shutil.copytree(made["run"], dest))


# --------------------------------------------------------------------------------------------
# Checkpoints.

# Replacements that are valid for an entry (it may be null, or any number, ...) and so are not
# damage; every other kind must be refused.
CHECKPOINT_VALID = {
    "step": {"int", "none"},
    "epoch": {"int", "float"},
    "channels": {"none"},
    "architecture": {"none"},  # checkpoints before architectures were recorded
    "scaler": {"none", "dict"},  # a CPU run has no gradient scaler to restore
    "prior": {"none"},
    "classes": {"list"},
    "mean": {"list"},
    "std": {"list"},
}
# The entries each command needs: removing one must be refused.
NEEDED = {"eval": ("model", "config"), "resume": ("model", "config", "optimizer", "step", "rng")}
TRAINING_STATE = ("optimizer", "rng", "scaler", "prior", "step", "epoch")


def damaged_checkpoints(state: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(name, command, state)``: each top-level entry replaced by each wrong kind, then each
    needed entry removed; ``command`` is ``eval``, or ``resume`` for the training state."""
    for key in state:
        for kind, value in WRONG.items():
            if kind in CHECKPOINT_VALID.get(key, ()):
                continue
            for command in ("eval", "resume") if key in TRAINING_STATE else ("eval",):
                yield f"{command} {key}={kind}", command, {**state, key: value}
    for command, keys in NEEDED.items():
        for key in keys:
            yield f"{command} without {key}", command, {k: v for k, v in state.items() if k != key}


def test_every_checkpoint_entry_of_a_wrong_kind_or_missing(made, tmp_path, capsys):
    cases = Cases(capsys)
    state = torch.load(made["run"] / "last.pt", weights_only=True)
    assert {"model", "config", "optimizer", "rng", "architecture"} <= set(state)
    for i, (name, command, bad) in enumerate(damaged_checkpoints(state)):
        if command == "eval":
            path = tmp_path / f"bad{i}.pt"
            torch.save(bad, path)
            cases.refused(name, ["eval", str(path)], path)
        else:
            run = copy_run(made, tmp_path / f"run{i}")
            torch.save(bad, run / "last.pt")
            cases.refused(name, ["train", "--resume", str(run)], run)
    cases.check()
    assert cases.count > 100


def _weight_damage(weights: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict]]:
    """The weights with one tensor of the wrong shape, dtype or value, or missing or extra."""
    names = [k for k, v in weights.items() if v.is_floating_point()]
    for key in (names[0], names[len(names) // 2], names[-1]):
        t = weights[key]
        yield f"{key} one longer", {**weights, key: torch.cat([t.flatten(), t.flatten()[:1]])}
        yield f"{key} as a row", {**weights, key: t.reshape(1, -1)}
        yield f"{key} of int64", {**weights, key: t.long()}
        yield f"{key} NaN", {**weights, key: torch.full_like(t, float("nan"))}
        yield f"{key} not a tensor", {**weights, key: t.tolist()}
        yield f"without {key}", {k: v for k, v in weights.items() if k != key}
    yield "an extra tensor", {**weights, "head.extra": torch.zeros(2)}


def test_checkpoint_tensors_of_wrong_shape_dtype_or_value(made, tmp_path, capsys):
    cases = Cases(capsys)
    state = torch.load(made["run"] / "last.pt", weights_only=True)
    for i, (name, weights) in enumerate(_weight_damage(state["model"])):
        path = tmp_path / f"bad{i}.pt"
        torch.save({**state, "model": weights}, path)
        cases.refused(f"eval: {name}", ["eval", str(path)], path, str(path))
        cases.refused(f"predict: {name}", ["predict", str(path), str(made["image"])], path)
        run = copy_run(made, tmp_path / f"run{i}")
        torch.save({**state, "model": weights}, run / "last.pt")
        cases.refused(f"resume: {name}", ["train", "--resume", str(run)], run)
    cases.check()


CUTS = (0, 1, 10, 100, 1000, 0.5, -2)


def _cuts(data: bytes) -> Iterator[tuple[float, bytes]]:
    """The file cut at each of :data:`CUTS` (a fraction, a length, or from the end) shorter
    than it."""
    for at in CUTS:
        n = int(len(data) * at) if isinstance(at, float) else at if at >= 0 else len(data) + at
        if n < len(data):
            yield at, data[:n]


def test_truncated_files(made, tmp_path, capsys):
    cases = Cases(capsys)
    for at, cut in _cuts((made["run"] / "last.pt").read_bytes()):
        path = tmp_path / f"cut{at}.pt"
        path.write_bytes(cut)
        cases.refused(f"last.pt cut at {at}", ["eval", str(path)], path)
    for name in ("model.json", "model.safetensors", "support.safetensors"):
        for at, cut in _cuts((made["export"] / name).read_bytes()):
            export = Path(shutil.copytree(made["export"], tmp_path / f"{name}{at}"))
            (export / name).write_bytes(cut)
            cases.refused(
                f"{name} cut at {at}", ["predict", str(export), str(made["image"])], export
            )
    cases.check()


# --------------------------------------------------------------------------------------------
# Exports.

MANIFEST_VALID = {
    "batch_size": {"int"},
    "preprocessing.size": {"int"},
    "classify.tau": {"int", "float"},
    "classify.chunk_size": {"int"},
    "classify.known": {"none"},
    "classify.known.tau": {"int", "float"},
    "classify.known.alpha": {"int", "float"},
    "classify.known.threshold": {"int", "float"},
    "classify.known.neighbours": {"int"},
    "classify.known.nodes": {"int"},
}
# Entries an old export may lack (they take defaults); any other removed must be refused.
MANIFEST_OPTIONAL = {"kind", "batch_size", "version", "classify.tau", "classify.chunk_size"}
MANIFEST_OPTIONAL |= {"classify.known", "classify.features", "classify.support"}
MANIFEST_OPTIONAL |= {"classify.num_support"} | {f"classify.known.{k}" for k in ("kind", "tau")}
MANIFEST_OPTIONAL |= {"classify.known.features", "classify.known.quantile"}
MANIFEST_OPTIONAL |= {f"classify.known.{k}" for k in ("neighbours", "nodes", "alpha")}


def _entries(m: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """Dotted names and paths of every entry of the description, sections' entries included
    (the architecture's are the model's and have their own checks)."""
    for key, value in m.items():
        yield prefix + key, [*prefix.split(".")[:-1], key] if prefix else [key]
        if isinstance(value, dict) and key != "architecture" and key != "encoder_kwargs":
            yield from _entries(value, f"{prefix}{key}.")


def _set(m: dict[str, Any], path: list[str], value: Any, remove: bool = False) -> dict:
    out = json.loads(json.dumps(m))
    node = out
    for p in path[:-1]:
        node = node[p]
    if remove:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def test_every_export_description_entry_of_a_wrong_kind_or_missing(made, tmp_path, capsys):
    cases = Cases(capsys)
    manifest = json.loads((made["export"] / "model.json").read_text())
    entries = list(_entries(manifest))
    assert {"classify.known.quantile", "preprocessing.mean", "batch_size"} <= dict(entries).keys()
    variants = []
    for name, path in entries:
        for kind, value in JSON_WRONG.items():
            if kind not in MANIFEST_VALID.get(name, ()):
                variants.append((f"{name}={kind}", _set(manifest, path, value)))
        if name not in MANIFEST_OPTIONAL:
            variants.append((f"without {name}", _set(manifest, path, None, remove=True)))
    for i, (name, bad) in enumerate(variants):
        export = Path(shutil.copytree(made["export"], tmp_path / f"e{i}"))
        (export / "model.json").write_text(json.dumps(bad))
        cases.refused(name, ["predict", str(export), str(made["image"])], export)
    cases.check()
    assert cases.count > 80


def _manifest_values(m: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    """Values of the right kind that are still wrong."""
    for size in (0, -1, 10**9):
        yield f"batch_size {size}", _set(m, ["batch_size"], size)
    for size in (0, 2, 100_000):
        yield f"image size {size}", _set(m, ["preprocessing", "size"], size)
    yield "fewer classes than labels", _set(m, ["classes"], m["classes"][:2])
    yield "no classes", _set(m, ["classes"], [])
    yield "twice a class", _set(m, ["classes"], [m["classes"][0]] * len(m["classes"]))
    yield "mean of 2 channels", _set(m, ["preprocessing", "mean"], [0.5, 0.5])
    yield "std 0", _set(m, ["preprocessing", "std"], [0.0, 0.2, 0.2])
    yield "one channel", _set(m, ["preprocessing", "channels"], 1)
    yield "support outside", _set(m, ["classify", "support"], "../model.safetensors")
    yield "newer version", _set(m, ["version"], 99)
    yield "a linear model of snn supports", _set(m, ["classify", "method"], "linear")
    yield "proj_out 10**9", _set(m, ["architecture", "proj_out"], 10**9)
    yield "unknown encoder", _set(m, ["architecture", "encoder"], "resnet5000")


def _support_values(s: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict]]:
    emb, labels = s["embeddings"], s["labels"]
    yield "embeddings one wider", {**s, "embeddings": torch.cat([emb, emb[:, :1]], 1)}
    yield "empty supports", {**s, "embeddings": emb[:0], "labels": labels[:0]}
    yield (
        "a label out of range",
        {**s, "labels": labels.clone().index_fill_(0, torch.tensor([0]), 3)},
    )
    yield "a negative label", {**s, "labels": labels.clone().index_fill_(0, torch.tensor([0]), -1)}
    yield "float labels", {**s, "labels": labels.float()}
    yield "fewer labels", {**s, "labels": labels[:-1]}
    yield "NaN embeddings", {**s, "embeddings": torch.full_like(emb, float("nan"))}
    yield "1-D embeddings", {**s, "embeddings": emb.flatten()}
    yield "no embeddings", {k: v for k, v in s.items() if k != "embeddings"}
    yield "no labels", {k: v for k, v in s.items() if k != "labels"}
    if "known" in s:
        yield "known one row short", {**s, "known": s["known"][:-1]}
        yield "known one wider", {**s, "known": torch.cat([s["known"], s["known"][:, :1]], 1)}


def test_export_values_and_support_tensors_that_do_not_fit(made, tmp_path, capsys):
    cases = Cases(capsys)
    manifest = json.loads((made["export"] / "model.json").read_text())
    support = load_file(str(made["export"] / "support.safetensors"))
    weights = load_file(str(made["export"] / "model.safetensors"))
    for i, (name, bad) in enumerate(_manifest_values(manifest)):
        export = Path(shutil.copytree(made["export"], tmp_path / f"m{i}"))
        (export / "model.json").write_text(json.dumps(bad))
        cases.refused(name, ["predict", str(export), str(made["image"])], export)
    tensors = [("support.safetensors", n, t) for n, t in _support_values(support)]
    tensors += [("model.safetensors", n, w) for n, w in _weight_damage(weights) if "not a" not in n]
    for i, (file, name, bad) in enumerate(tensors):
        export = Path(shutil.copytree(made["export"], tmp_path / f"s{i}"))
        save_file({k: v.contiguous() for k, v in bad.items()}, str(export / file))
        cases.refused(
            f"{file}: {name}",
            ["embed", str(export), str(made["image"]), "--out", str(tmp_path / f"s{i}.npy")],
            export,
        )
        assert not (tmp_path / f"s{i}.npy").exists()
    cases.check()


# --------------------------------------------------------------------------------------------
# Configs, CIFAR batches, images and output paths.


def _encodings(text: str) -> Iterator[tuple[str, bytes]]:
    accented = "# r\u00e9sum\u00e9: the first run\n" + text
    yield "UTF-16 with a BOM", text.encode("utf-16")
    yield "UTF-16-LE", text.encode("utf-16-le")
    yield "UTF-16-BE", text.encode("utf-16-be")
    yield "UTF-32", text.encode("utf-32")
    yield "latin-1", accented.encode("latin-1")
    yield "cp1252", accented.encode("cp1252")
    yield "random bytes", np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    yield "a NUL byte", text.encode()[:40] + b"\x00" + text.encode()[40:]
    yield "gzip", zlib.compress(text.encode())
    yield "a pickle", pickle.dumps({"optim": {"steps": 2}})


def test_configs_that_are_not_utf8_yaml(made, tmp_path, capsys):
    cases = Cases(capsys)
    text = made["config"].read_text()
    for i, (name, data) in enumerate(_encodings(text)):
        path = tmp_path / f"cfg{i}.yaml"
        path.write_bytes(data)
        out = tmp_path / f"run{i}"
        cases.refused(f"train: {name}", ["train", "--config", str(path), "--out", str(out)], path)
        assert not out.exists(), name
        cases.refused(f"config: {name}", ["config", "--config", str(path)], path)
        run = copy_run(made, tmp_path / f"resume{i}")
        (run / "config.yaml").write_bytes(data)
        cases.refused(f"resume: {name}", ["train", "--resume", str(run)], run)
    cases.check()


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


def bomb_png(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A valid PNG header claiming ``width`` x ``height`` grey pixels, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


def _bad_output_paths(tmp: Path) -> Iterator[tuple[str, Path, bool]]:
    """``(kind, path, is a folder wanted)`` of outputs that cannot be written."""
    (tmp / "a_file").write_text("keep me\n")
    (tmp / "a_dir.npy").mkdir()
    if os.geteuid() == 0:  # the superuser writes anywhere but in /sys
        locked = Path("/sys/paws-out")
    else:
        (tmp / "locked").mkdir(mode=0o500)
        locked = tmp / "locked" / "out"
    yield "an existing file", tmp / "a_file", True
    yield "a path below a file", tmp / "a_file" / "out", True
    yield "a path below a file, deeper", tmp / "a_file" / "x" / "y", True
    yield "an unwritable folder", locked, True
    yield "an existing folder", tmp / "a_dir.npy", False
    yield "a file below a file", tmp / "a_file" / "out.csv", False
    yield "a file in an unwritable folder", locked / "out.csv", False


def test_output_paths_that_cannot_be_written(made, tmp_path, capsys):
    cases = Cases(capsys)
    run, export, image = made["run"], made["export"], str(made["image"])
    overrides = ["--set", f"data.labeled={made['labeled']}", "--set", f"data.test={made['test']}"]
    for kind, path, folder in _bad_output_paths(tmp_path):
        out = str(path)
        if folder:
            commands = {
                "train": ["train", "--config", str(made["config"]), "--out", out],
                "export": ["export", str(run), "--out", out],
                "baseline": ["baseline", "--config", str(made["config"]), *overrides, "--out", out],
                "report": ["report", str(run), "--out", out],
                "finetune": ["finetune", str(run), "--out", out],
                "tighten": ["tighten", str(run), "--out", out],
            }
        else:
            npy = str(path.with_suffix(".npy")) if path.suffix else out
            commands = {
                "predict": ["predict", str(export), image, "--out", out],
                "embed": ["embed", str(export), image, "--out", npy],
            }
        for command, argv in commands.items():
            target = argv[argv.index("--out") + 1]
            cases.refused(f"{command} --out {kind}", argv, [tmp_path, run, export], target)
    cases.check()
    assert (tmp_path / "a_file").read_text() == "keep me\n"


# --------------------------------------------------------------------------------------------
# What once went silently wrong, or ended in a traceback.


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


def test_skip_on_disk_leaves_bad_labelled_and_test_images_out_and_counts_them(tmp_path, capfd):
    labeled = write_folder(tmp_path / "labeled", names=ANIMALS, channels=3)
    test = write_folder(tmp_path / "test", names=ANIMALS, channels=3, per_class=2, seed=3)
    bad = [bomb_png(labeled / "cat" / "bomb.png"), test / "dog" / "notes.png"]
    bad[1].write_text("not an image\n")
    settings = [
        "data.in_memory=no",
        "data.workers=2",
        "data.on_bad_image=skip",
        "optim.steps=2",
        "tighten.after_training=false",
    ]
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(labeled, f"data.test={test}", *settings))
    run = tmp_path / "run"
    with torch_state():
        code = cli.main(["train", "--config", str(cfg), "--out", str(run)])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "skipped 2 unreadable images" in out
    assert sorted((run / "skipped_images.txt").read_text().split()) == sorted(map(str, bad))
    assert "data: 18 unlabelled, 18 labelled (3 classes), 6 test; on disk" in err
    assert json.loads((run / "eval.json").read_text())["num_query"] == 6


def test_an_empty_config_yaml_refuses_to_resume(made, tmp_path, capsys):
    run = copy_run(made, tmp_path / "run")
    (run / "config.yaml").write_bytes(b"")
    before = snapshot(run)
    line = error_line(run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)[2])
    assert line == (
        f"cannot resume {run}: its config.yaml is empty (a write that did not finish?); give "
        "the run's config with --config FILE"
    )
    assert snapshot(run) == before


def test_a_full_disk_while_writing_the_config_keeps_the_old_one(
    made, tmp_path, capsys, monkeypatch
):
    import paws.files

    run = copy_run(made, tmp_path / "run")
    old = (run / "config.yaml").read_bytes()
    real = os.fsync

    def full(fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(run / ".config.yaml.")):
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(paws.files.os, "fsync", full)
    line = error_line(run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)[2])
    assert line == (
        f"could not write {run / 'config.yaml'}: No space left on device; the previous file "
        "is intact"
    )
    assert (run / "config.yaml").read_bytes() == old
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(paws.files.os, "fsync", real)  # space freed: the resume finishes
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)
    assert code == 0, err


def _steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_a_second_run_into_a_running_directory_is_refused(made, tmp_path, capsys):
    run = copy_run(made, tmp_path / "run")
    before = snapshot(run)
    with RunLock(run):  # as a paws train still running
        holder = (run / LOCK).read_text().strip()
        assert holder.startswith(f"process {os.getpid()} on ")
        for argv in (
            ["train", "--resume", str(run)],
            ["train", "--config", str(made["config"]), "--out", str(run)],
        ):
            line = error_line(run_cli(["--quiet", *argv], capsys, None)[2])
            assert line == (
                f"{run} is in use by {holder}, which is still training into it; wait for it "
                "to end or stop it, or choose another --out"
            )
    assert snapshot(run) == before


def test_a_stale_lock_does_not_block_and_a_finished_run_resumed_logs_no_row_twice(
    made, tmp_path, capsys
):
    run = copy_run(made, tmp_path / "run")
    (run / LOCK).write_text("process 999999999 on a machine that was switched off\n")
    metrics, evals = _steps(run / "metrics.csv"), _steps(run / "evals.csv")
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)
    assert code == 0, err
    assert not (run / LOCK).exists()
    assert _steps(run / "metrics.csv") == metrics == [1, 2, 3, 4]
    assert _steps(run / "evals.csv") == evals == [4]


def test_a_resume_after_a_kill_before_the_first_checkpoint_logs_each_step_once(
    made, tmp_path, capsys
):
    run = copy_run(made, tmp_path / "run")
    for name in ("last.pt", "final.pt", "tighten.pt", "eval.json", "evals.csv"):
        (run / name).unlink()
    assert _steps(run / "metrics.csv") == [1, 2, 3, 4]  # rows no checkpoint kept
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)
    assert code == 0, err
    assert _steps(run / "metrics.csv") == [1, 2, 3, 4]
    assert torch.load(run / "final.pt", weights_only=True)["step"] == 4
