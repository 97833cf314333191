"""PAWS on uncurated unlabelled images: classes nobody labelled, long tails, uneven label counts.

Every setting is built from Fashion-MNIST and trained with the default recipe (830 steps of
128 images: a smaller unlabelled set trains as many steps, ``optim.min_steps``), scored as
``paws train`` reports it (PAWS-NN of the final model, after tightening), 3 seeds each, each
seed a different draw of the labels (``data.split_seed``) and of the weights (``run.seed``):

- ``out_of_class``: 10 labels for each of 6 classes (T-shirt/top, Trouser, Pullover, Dress,
  Coat, Sandal); the unlabelled set is the whole training set, 40% of it of the 4 classes
  nobody labelled (Shirt, Sneaker, Bag, Ankle boot). Accuracy on the 6 classes' test images,
  and the AUROC of the known score (``paws eval --unknown``) with the other 4 classes' test
  images as unknown. Arms: PAWS, RoPAWS (``loss.ropaws``).
- ``long_tail``: the unlabelled set subsampled to an exponential class profile of imbalance
  ratio 100 (6,000 images of class 0 down to 60 of class 9), 10 labels per class, the balanced
  test set; balanced accuracy. Arms: ME-MAX towards uniform (the paper), and towards a prior
  (``loss.me_max_prior``).
- ``long_tail_labels``: the same, but the labels follow the profile too (1% of each class, at
  least 1). Arms as for ``long_tail``.
- ``uneven``: 100 labels drawn uniformly at random from the training set (``data.num_labels``:
  classes get 2 to 17); it must train with no override. Arm: PAWS (the same runs as arm A of
  ``benchmarks/label_selection.py``).

    python benchmarks/uncurated.py [--settings out_of_class long_tail ...] [--seeds 0 1 2]
        [--arms ...] [--out runs/uncurated] [--set key=value ...]

Each run goes to ``OUT/<setting>/<arm>/seed<N>`` and is skipped when it already finished (its
figures are read back), so the script can be run piecewise. Figures are also written to
``OUT/results.json`` (merged with those of earlier invocations).
"""

# ruff: noqa: E402 - the environment is set before torch is imported
from __future__ import annotations

from paws.cli import quiet_idle_threads

quiet_idle_threads()

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from paws import progress, runtime
from paws.after.evaluate import unknown_detection
from paws.config import Config, load_config
from paws.data import Datasets, ImageSet, load_datasets
from paws.pretrain.train import train
from paws.rundir import restore_model

KNOWN, UNKNOWN = [0, 1, 2, 3, 4, 5], [6, 7, 8, 9]
ARMS = {
    "out_of_class": {"paws": [], "ropaws": ["loss.ropaws=true"]},
    "long_tail": {"uniform": [], "estimated": ["loss.me_max_prior=estimated"]},
    "long_tail_labels": {
        "uniform": [],
        "labeled": ["loss.me_max_prior=labeled"],
        "estimated": ["loss.me_max_prior=estimated"],
    },
    "uneven": {"paws": ["data.num_labels=100"]},
}


def _relabel(s: ImageSet, keep: list[int]) -> ImageSet:
    """The images of classes ``keep``, labelled by their position in it."""
    index = np.flatnonzero(np.isin(s.labels, keep))
    out = s.subset(index)
    out.labels = np.searchsorted(np.asarray(keep), out.labels)
    return out


def _unlabelled(s: ImageSet) -> ImageSet:
    return dataclasses.replace(s, labels=-np.ones(len(s), dtype=np.int64))


def long_tail_counts(largest: int = 6000, ratio: float = 100.0, classes: int = 10) -> list[int]:
    """Images per class of an exponential profile: ``largest * ratio ** (-c / (classes - 1))``."""
    return [int(round(largest * ratio ** (-c / (classes - 1)))) for c in range(classes)]


def build(setting: str, cfg: Config, seed: int) -> tuple[Datasets, ImageSet | None]:
    """The datasets of a setting (and, for out_of_class, the unknown test images)."""
    full = load_datasets(cfg)  # the default: 10 labels a class drawn with data.split_seed
    train_set = full.unlabeled  # the whole training set; labels hidden
    train_labels = ImageSet(labels=np.asarray(_train_labels(cfg)), names=train_set.names)
    if setting == "out_of_class":
        labeled = _relabel(full.labeled, KNOWN)
        test = _relabel(full.test, KNOWN)
        unknown = full.test.subset(np.flatnonzero(np.isin(full.test.labels, UNKNOWN)))
        classes = [full.classes[c] for c in KNOWN]
        data = dataclasses.replace(full, labeled=labeled, test=test, classes=classes)
        return data, unknown
    if setting in ("long_tail", "long_tail_labels"):
        rng = np.random.default_rng([seed, 7])
        counts = long_tail_counts()
        keep = np.sort(
            np.concatenate(
                [
                    rng.choice(np.flatnonzero(train_labels.labels == c), n, replace=False)
                    for c, n in enumerate(counts)
                ]
            )
        )
        unl = train_set.subset(keep)
        y = train_labels.labels[keep]
        if setting == "long_tail":
            per_class = [10] * len(counts)
        else:
            per_class = [max(1, int(round(0.01 * n))) for n in counts]
        chosen = np.sort(
            np.concatenate(
                [
                    rng.choice(np.flatnonzero(y == c), k, replace=False)
                    for c, k in enumerate(per_class)
                ]
            )
        )
        labeled = unl.subset(chosen)
        labeled.labels = y[chosen]
        return dataclasses.replace(full, unlabeled=_unlabelled(unl), labeled=labeled), None
    return full, None


def _train_labels(cfg: Config) -> np.ndarray:
    """Fashion-MNIST's training labels (the benchmark plays the person who knows them)."""
    from paws.data.builtin import load_fashion_mnist

    return load_fashion_mnist(cfg.data.root)[0].labels


def run_one(setting: str, arm: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """Train one arm of one setting for one seed (or read its finished figures)."""
    run_dir = out / setting / arm / f"seed{seed}"
    done = run_dir / "benchmark.json"
    changes = [*ARMS[setting][arm], f"data.split_seed={seed}", f"run.seed={seed}", *overrides]
    cfg = load_config(None, changes)
    device = runtime.setup(cfg)
    data, unknown = build(setting, cfg, seed)
    if done.is_file():
        figures = json.loads(done.read_text())
    else:
        start = time.time()
        if (run_dir / "last.pt").exists():  # an unfinished run: start it again
            for f in run_dir.iterdir():
                f.unlink()
        ev = train(cfg, run_dir, data=data, device=device)["eval"]
        figures = {
            "top1": ev["top1"],
            "balanced_top1": ev["balanced_top1"],
            "pretrained_top1": ev.get("pretrained", {}).get("top1"),
            "num_labeled": len(data.labeled),
            "labels_per_class": np.bincount(data.labeled.labels).tolist(),
            "num_unlabeled": len(data.unlabeled),
            "minutes": (time.time() - start) / 60,
        }
        done.write_text(json.dumps(figures, indent=2) + "\n")
    if unknown is not None:  # scored anew each time: a few seconds
        cfg_run, model, _ = restore_model(run_dir, overrides)
        u = unknown_detection(model.to(device), data, cfg_run, device, unknown)
        figures.update(auroc=u["auroc"], fpr_at_95_tpr=u["fpr_at_95_tpr"])
    return figures


def _summary(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} ± {spread:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--arms", nargs="+", help="only these arms (default: every arm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/uncurated")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    progress.set_quiet(True)
    out = Path(a.out)
    saved = out / "results.json"  # figures of earlier invocations are kept
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {}
    for setting in a.settings:
        for arm in ARMS[setting]:
            if a.arms and arm not in a.arms:
                continue
            rows = [run_one(setting, arm, s, out, a.overrides) for s in a.seeds]
            results.setdefault(setting, {})[arm] = rows
            metric = "top1" if setting == "out_of_class" else "balanced_top1"
            per_seed = "  ".join(f"{r[metric]:6.2f}" for r in rows)
            mean = _summary([r[metric] for r in rows])
            line = f"{setting:17s} {arm:10s} {metric} {per_seed}   mean {mean}"
            if "auroc" in rows[0]:
                line += f"   AUROC {_summary([r['auroc'] for r in rows])}"
            minutes = statistics.mean(r["minutes"] for r in rows)
            print(f"{line}   ({minutes:.1f} min a run)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
