"""Tiny image folders, configs and ways to run the ``paws`` command, for end-to-end tests.

A run here has 3 classes of 6 images of 12x12 pixels, a width-4 ``cnn_small``, 8-pixel views and
a few tens of steps: seconds on one CPU core, most of it importing torch.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from paws import cli

CLASSES = ("cat", "dog", "fox")


def write_folder(
    root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 6, size: int = 12
) -> Path:
    """A ``<class>/<image>.png`` folder of random images with a class-dependent colour."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            a[..., c % 3] += 120
            Image.fromarray(a).save(d / f"{name}{i}.png")
    return root


def tiny_config(labeled: Path, **overrides: Any) -> dict[str, Any]:
    """A config for a few-second CPU run on ``labeled``; ``section__key=value`` overrides."""
    cfg: dict[str, Any] = {
        "data": {
            "dataset": "folder",
            "labeled": str(labeled),
            "labels_per_class": None,
            "workers": 0,
        },
        "views": {"large_size": 8, "small_size": 4, "small_crops": 2},
        "support": {"classes": 3, "images_per_class": 2},
        "model": {"encoder": "cnn_small", "width": 4, "proj_hidden": 16, "proj_out": 8},
        "optim": {"batch_size": 6, "steps": 16, "warmup_epochs": 1.0},
        "run": {
            "device": "cpu",
            "threads": 1,
            "deterministic": True,
            "log_every": 1,
            "checkpoint_every": 4,
            "monitor_every": 0,
        },
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(argv: list[str], capsys: Any, monkeypatch: Any) -> tuple[int, str, str]:
    """``paws ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    monkeypatch.setenv("PAWS_QUIET", "0")  # restored after the test; --quiet sets it
    with torch_state():
        code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """``python -m paws ARGV`` in a new process group, capturing text output."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "paws", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
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


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


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
