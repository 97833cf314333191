"""Tiny synthetic data and tiny runs for the tests, and ways to run the ``paws`` command.

Images:
    ``pattern`` draws one picture of a class; ``write_folder`` writes a ``<class>/<image>.png``
    folder of them (number of classes, images per class, size, grey or colour, seed).
Runs:
    ``tiny_overrides(folders, *changes)`` gives the ``section.key=value`` settings of a run that
    takes seconds on one CPU core (``TINY``, then ``changes``); ``EVALUATED`` and ``RESUMABLE``
    are the changes of a run evaluated along the way and of one the tests interrupt and resume;
    ``tiny_config`` is a ``RESUMABLE`` run as a nested dict for a YAML config file
    (``write_config``); ``train_tiny`` trains a run in this process.
The command:
    ``run_cli`` runs ``paws`` in this process (``torch_state`` undoes its global torch
    settings), ``run_paws`` and ``popen`` in a new one;
    ``error_line`` checks that a user error is one line; ``set_args`` turns settings into
    ``--set`` arguments; ``write_evil_checkpoint`` writes a file that runs code if unpickled;
    ``paws_train`` runs ``paws train`` on a config and ``expect_error`` takes its one line.
Files:
    ``read_rows`` and ``write_rows`` (CSV), ``write_fashion`` (Fashion-MNIST idx files),
    ``truncated_jpeg``, ``text_as_jpeg`` and ``bomb_png`` (unreadable images), ``clusters``
    (embeddings of known clusters), ``logged_steps`` (the steps of a metrics CSV) and
    ``finite_checkpoint``.
Damaged inputs:
    ``Cases`` runs the command on each damaged copy (``copy_run``, ``snapshot``) of a file and
    collects the cases that do not end in one line; ``WRONG`` holds a value of every kind and
    ``weight_damage`` the ways a tensor can be wrong.

Fixtures built from these live in ``conftest.py``.
"""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from paws import cli
from paws.config import apply_overrides, load_config
from paws.labelling.strategies import (
    unit_rows,
)
from paws.pretrain.train import train

# Class names of the colour folder that the command-line tests break in many ways.
ANIMALS = ("cat", "dog", "fox")


def pattern(label: int, size: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """One picture of class ``label``: a (size, size) or, with 3 channels, (size, size, 3) uint8.

    Each of classes 0..5 is a texture (horizontal or vertical stripes, a checkerboard, a blob,
    diagonal stripes, wide bars) at its own brightness, with a random phase and noise: a few
    steps of a tiny CNN separate the classes, new ones included, yet not always perfectly.
    Larger labels repeat these six. In colour, the class also brightens one channel.
    """
    c = label % 6
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if c == 0:
        img = np.sin(y * np.pi / 2 + phase)
    elif c == 1:
        img = np.sin(x * np.pi / 2 + phase)
    elif c == 2:
        img = np.sin(x * np.pi / 2 + phase) * np.sin(y * np.pi / 2 + phase)
    elif c == 3:
        r2 = (x - size / 2 + rng.uniform(-2, 2)) ** 2 + (y - size / 2 + rng.uniform(-2, 2)) ** 2
        img = 2 * np.exp(-r2 / (size / 3) ** 2) - 1
    elif c == 4:
        img = np.sin((x + y) * np.pi / 3 + phase)
    else:
        img = np.sign(np.sin(x * np.pi / 8 + phase)) * 0.8
    img = 40 + 30 * c + 40 * img + rng.normal(0, 12, img.shape)
    if channels == 3:
        img = np.repeat(img[..., None], 3, axis=2)
        img[..., label % 3] += 60
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(
    root: Path,
    classes: int | Sequence[int] = 3,
    per_class: int = 6,
    *,
    size: int = 12,
    channels: int = 1,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> Path:
    """Write ``root/<name>/<name>_<i>.png`` pictures of each class; returns ``root``.

    Args:
        root: Folder to write (created; may exist).
        classes: How many classes (0, 1, ...) or which ones, e.g. ``[0, 1, 4]``.
        per_class: Images of each class.
        size: Side of the square images in pixels.
        channels: 1 for grey images, 3 for colour ones.
        seed: Seed of the noise, so that two folders can hold different images.
        names: Folder names of the classes; ``class<c>`` by default.
    """
    labels = list(range(classes)) if isinstance(classes, int) else list(classes)
    names = list(names) if names is not None else [f"class{c}" for c in labels]
    assert len(names) == len(labels), (names, labels)
    rng = np.random.default_rng(seed)
    for c, name in zip(labels, names):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(c, size, rng, channels)).save(d / f"{name}_{i}.png")
    return root


# Settings every tiny run shares: 12- and 8-pixel views, a width-4 CNN, 3 classes of 2 supports,
# 4 steps, then 3 tightening steps; the baseline as many steps.
TINY = [
    "data.workers=0",
    "views.large_size=12",
    "views.small_size=8",
    "views.small_crops=2",
    "model.encoder=cnn_small",
    "model.width=4",
    "model.proj_hidden=16",
    "model.proj_out=8",
    "support.classes=3",
    "support.images_per_class=2",
    "optim.batch_size=8",
    "optim.steps=4",
    "run.device=cpu",
    "run.log_every=1",
    "run.monitor_every=0",
    "tighten.steps=3",
    "baseline.min_epochs=0",
]

# A run that is watched as it trains: 6 steps, monitoring metrics every 2 steps, PAWS-NN every 3.
EVALUATED = [
    "views.small_crops=1",
    "optim.steps=6",
    "run.monitor_every=2",
    "run.eval_every=3",
]

# A run that the command-line tests interrupt, resume and break: 16 deterministic steps of
# 8-pixel views, a checkpoint every 4.
RESUMABLE = [
    "data.labels_per_class=null",
    "views.large_size=8",
    "views.small_size=4",
    "optim.batch_size=6",
    "optim.steps=16",
    "run.threads=1",
    "run.deterministic=true",
    "run.checkpoint_every=4",
]


def tiny_overrides(folders: Mapping[str, Path], *changes: str) -> list[str]:
    """``section.key=value`` settings of a tiny run on image folders.

    Args:
        folders: Paths under the keys ``labeled`` and optionally ``unlabeled`` and ``test``
            (other keys are ignored).
        changes: Further settings; they win over the tiny ones.
    """
    data = [f"data.{k}={folders[k]}" for k in ("labeled", "unlabeled", "test") if k in folders]
    return ["data.dataset=folder", *data, *TINY, *changes]


def tiny_config(labeled: Path, *changes: str) -> dict[str, Any]:
    """The nested dict of a YAML config for a ``RESUMABLE`` tiny run on a labelled folder."""
    return apply_overrides({}, tiny_overrides({"labeled": labeled}, *RESUMABLE, *changes))


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write ``cfg`` as YAML to ``path``; returns ``path``."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_tiny(out: Path, overrides: list[str]) -> Path:
    """Train a run with these settings into ``out`` in this process; returns ``out``."""
    result = train(load_config(None, overrides), out)
    assert result["status"] == "done"
    return out


def set_args(overrides: list[str]) -> list[str]:
    """``--set`` arguments of the ``paws`` command for ``section.key=value`` settings."""
    return [a for o in overrides for a in ("--set", o)]


def run_cli(argv: list[str], capsys: Any, monkeypatch: Any) -> tuple[int, str, str]:
    """``paws ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    with torch_state():
        code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_paws(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m paws ARGV`` to completion, capturing text output; ``check``: it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "paws", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"paws {' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """``python -m paws ARGV`` started in a new process group, capturing text output."""
    return subprocess.Popen(
        [sys.executable, "-m", "paws", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
        **kwargs,
    )


def error_line(err: str) -> str:
    """The one line a user error prints, checked to be alone and free of tracebacks."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("paws: error: "), err
    return lines[0][len("paws: error: ") :]


class torch_state:
    """Restores the global torch settings a run changes (threads, determinism)."""

    def __enter__(self) -> torch_state:
        self.threads = torch.get_num_threads()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.deterministic)


class _Evil:
    """Runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil_checkpoint(path: Path, marker: Path, fmt: str) -> Path:
    """A checkpoint file that creates ``marker`` if unpickled: a raw pickle or torch's zip."""
    payload = {"model": {"w": torch.zeros(1)}, "config": {}, "hook": _Evil(marker)}
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """A CSV file of ``header`` and ``rows`` (a labels or suggestions file); returns ``path``."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` as a gzipped idx file of unsigned bytes, as Fashion-MNIST ships them."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    """A Fashion-MNIST folder of random 28x28 images, labels 0..9 in turn."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def clusters(k: int, per: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """(k * per, dim) unit rows around k random directions, and each row's cluster."""
    g = torch.Generator().manual_seed(seed)
    centres = unit_rows(torch.randn(k, dim, generator=g))
    which = torch.arange(k).repeat_interleave(per)
    x = unit_rows(centres[which] + spread * torch.randn(k * per, dim, generator=g))
    return x, which.numpy()


# Images read from disk by data-loader workers, not decoded into memory first.
DISK = ["data.in_memory=no", "data.workers=2"]


def paws_train(tmp_path, capsys, monkeypatch, cfg: dict, *extra: str, quiet: bool = True):
    """``paws [--quiet] train --config CFG --out RUN EXTRA``: (exit code, stdout, stderr)."""
    path = write_config(tmp_path / "cfg.yaml", cfg)
    argv = ["train", "--config", str(path), "--out", str(tmp_path / "run"), *extra]
    return run_cli(["--quiet", *argv] if quiet else argv, capsys, monkeypatch)


def expect_error(result: tuple[int, str, str]) -> str:
    """The one line of a user error, from the (exit code, stdout, stderr) of a command that
    must have exited with status 2."""
    code, _, err = result
    assert code == 2, err
    return error_line(err)


def truncated_jpeg(folder: Path) -> Path:
    """A JPEG of ``folder``'s first cat cut after 300 bytes, as a failed copy leaves it."""
    path = folder / "cat" / "cut.jpg"
    Image.open(folder / "cat" / "cat_0.png").save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])
    return path


def text_as_jpeg(folder: Path) -> Path:
    """A text file named like a JPEG among ``folder``'s dogs."""
    path = folder / "dog" / "notes.jpg"
    path.write_text("shopping list: milk, eggs\n")
    return path


def finite_checkpoint(path: Path) -> int:
    """The step of the checkpoint at ``path``, after checking that its weights and optimizer
    state hold no infinity or NaN."""
    state = torch.load(path, weights_only=True)
    tensors = list(state["model"].values())
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return state["step"]


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
    """Runs cases of damaged inputs and collects those that do not end as a user error should.

    A family of cases damages a copy of one file in every way it lists (each entry replaced by
    each wrong kind of value, and removed; tensors of the wrong shape or dtype; files cut at
    several lengths; configs in other encodings; output paths that cannot be written) and runs
    the ``paws`` command on it. Every case must exit with status 2, print exactly one non-empty
    line on stderr (``paws: error: ...``) and no traceback, and leave the files it was given as
    they were. :meth:`check` fails with every failing case at once, so one run shows them all.
    """

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


def copy_run(made: dict[str, Path], dest: Path) -> Path:
    """A copy of the run directory of the ``made`` fixture (conftest.py), to damage."""
    return Path(shutil.copytree(made["run"], dest))


def weight_damage(weights: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict]]:
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


def bomb_png(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A valid PNG header claiming ``width`` x ``height`` grey pixels, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


def logged_steps(path: Path) -> list[int]:
    """The steps of the rows of a metrics or evals CSV file, in order."""
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]
