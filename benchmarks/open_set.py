"""Known scores compared: how well each tells images of classes nobody labelled from the others.

Two settings, each with 6 labelled classes and 4 that occur only among the unlabelled images:

- ``fashion``: ``benchmarks/uncurated.py``'s out_of_class runs (read from ``--runs``, trained by
  that script: 10 labels a class, 40% of the unlabelled images of the other 4 classes); test
  images of the 6 classes are known, of the other 4 unknown.
- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, enlarged to 28x28 grey), a third
  held out as the test set; digits 0-5 labelled with 1 to 8 images a class (uneven, drawn per
  seed), the other two thirds of every digit unlabelled. Trained here with the default recipe
  (``--set`` changes it, e.g. ``optim.steps``).

For each run the chosen model (``choice.json``) embeds the labelled, unlabelled (at most
``--max-nodes``), test and unknown images, and every known score is measured on the same
embeddings: AUROC, FPR at 95% TPR, and the share of known and unknown test images below the
threshold each calibrates on the labels.

    python benchmarks/open_set.py --runs runs/uncurated --out runs/open-set [--seeds 0 1 2]
        [--settings fashion digits] [--set optim.steps=200]
"""

# ruff: noqa: E402 - the environment is set before torch is imported
from __future__ import annotations

from paws.cli import quiet_idle_threads

quiet_idle_threads()

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from paws import progress, runtime
from paws.apply.embedding import embed_images
from paws.config import load_config
from paws.data import Datasets, ImageSet, Loading
from paws.labelling.new_classes import new_class_groups
from paws.labelling.strategies import TensorSource, kmeans_select, unit_rows
from paws.method.diffusion import build_known_graph
from paws.method.known_score import KnownScore, detection_metrics
from paws.pretrain.train import train
from paws.rundir import restore_model

KNOWN, UNKNOWN = [0, 1, 2, 3, 4, 5], [6, 7, 8, 9]
SCORES = ["soft", "nearest", "diffusion"]


def digits(seed: int) -> tuple[Datasets, ImageSet]:
    """The digits setting of one seed, and its unknown test images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=28, mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = np.asarray(d.target, np.int64)
    rng = np.random.default_rng([seed, 24])
    order = rng.permutation(len(y))
    test_idx, train_idx = np.sort(order[: len(y) // 3]), np.sort(order[len(y) // 3 :])
    names = [f"digit{i}" for i in range(len(y))]

    def subset(index: np.ndarray, labels: np.ndarray) -> ImageSet:
        return ImageSet(labels=labels, names=[names[i] for i in index], images=images[index])

    labeled_idx = np.sort(
        np.concatenate(
            [
                rng.choice(train_idx[y[train_idx] == c], int(rng.integers(1, 9)), replace=False)
                for c in KNOWN
            ]
        )
    )
    known_test = test_idx[np.isin(y[test_idx], KNOWN)]
    unknown_test = test_idx[np.isin(y[test_idx], UNKNOWN)]
    mean = float(images.float().mean() / 255)
    std = float(images.float().std() / 255)
    data = Datasets(
        unlabeled=subset(train_idx, -np.ones(len(train_idx), np.int64)),
        labeled=subset(labeled_idx, y[labeled_idx]),
        test=subset(known_test, y[known_test]),
        classes=[str(c) for c in KNOWN],
        channels=1,
        mean=(mean,),
        std=(std,),
    )
    return data, subset(unknown_test, y[unknown_test])


def fashion(cfg, seed: int) -> tuple[Datasets, ImageSet]:
    """``benchmarks/uncurated.py``'s out_of_class setting of one seed."""
    sys.path.insert(0, str(Path(__file__).parent))
    import uncurated

    data, unknown = uncurated.build("out_of_class", cfg, seed)
    return data, unknown


def measure(
    run_dir: Path,
    data: Datasets,
    unknown: ImageSet,
    max_nodes: int,
    seed: int,
    truth: np.ndarray | None = None,
) -> dict:
    """Every known score of one run on the same trunk embeddings; with the unlabelled images'
    ``truth``, also what ``paws suggest`` tags as new (:func:`tagging`)."""
    cfg, model, _ = restore_model(run_dir)
    device = torch.device("cpu")
    loading = Loading.of(cfg, data)

    def embed(images: ImageSet) -> torch.Tensor:
        return embed_images(model, images, cfg, loading, device, "trunk").cpu()

    rng = np.random.default_rng([seed, 5])
    pool_index = np.arange(len(data.unlabeled))
    if len(pool_index) > max_nodes:
        pool_index = np.sort(rng.choice(len(pool_index), max_nodes, replace=False))
    pool = data.unlabeled.subset(pool_index)
    lab, unl = embed(data.labeled), embed(pool)
    known, other = embed(data.test), embed(unknown)
    labels = torch.from_numpy(np.asarray(data.labeled.labels, np.int64))
    out = {}
    for kind in ("soft", "nearest"):
        ks = KnownScore(kind=kind)
        sk, so = ks.scores(known, lab).numpy(), ks.scores(other, lab).numpy()
        out[kind] = _figures(sk, so, ks.threshold(lab))
    g = build_known_graph(lab, labels, unl)
    out["diffusion"] = _figures(g.query(known).numpy(), g.query(other).numpy(), g.threshold)
    if truth is not None:
        out["suggest"] = tagging(unl, lab, labels, truth[pool_index])
    return out


def tagging(pool: torch.Tensor, lab: torch.Tensor, labels: torch.Tensor, truth: np.ndarray) -> dict:
    """What ``paws suggest -n 20`` (coverage in the trunk's embedding) proposes as ``new:<k>``:
    the picks of classes nobody labelled (``truth`` >= 6) and of labelled ones tagged new."""
    source = TensorSource(unit_rows(pool))
    picks = kmeans_select(source, 20, unit_rows(lab), seed=0)
    new = new_class_groups(source, lab, labels, KnownScore(), len(KNOWN))
    unseen, tagged = truth[picks] >= len(KNOWN), new.group[picks] > 0
    return {
        "unknown_picks": int(unseen.sum()),
        "unknown_classes": len(set(truth[picks][unseen].tolist())),
        "unknown_tagged": int((unseen & tagged).sum()),
        "known_tagged": int((~unseen & tagged).sum()),
    }


def _figures(known: np.ndarray, other: np.ndarray, threshold: float) -> dict:
    return {
        **detection_metrics(known, other),
        "known_flagged": float(100 * np.mean(known < threshold)),
        "unknown_flagged": float(100 * np.mean(other < threshold)),
    }


def run_seed(setting: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (digits) or find (fashion) the run of one seed, and measure its scores."""
    changes = [f"data.split_seed={seed}", f"run.seed={seed}", *args.overrides]
    cfg = load_config(None, changes)
    runtime.setup(cfg)
    if setting == "fashion":
        run_dir = Path(args.runs) / "out_of_class" / "paws" / f"seed{seed}"
        data, unknown = fashion(cfg, seed)
    else:
        run_dir = Path(args.out) / "digits" / f"seed{seed}"
        data, unknown = digits(seed)
        if not (run_dir / "choice.json").is_file():
            train(cfg, run_dir, data=data, device=torch.device("cpu"))
        truth = _digit_truth(data.unlabeled)
        return measure(run_dir, data, unknown, args.max_nodes, seed, truth)
    return measure(run_dir, data, unknown, args.max_nodes, seed)


def _digit_truth(images: ImageSet) -> np.ndarray:
    """The digit of each of the digits setting's images (named ``digit<index>``)."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    return np.array([target[int(name[len("digit") :])] for name in images.names])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["fashion", "digits"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="runs/uncurated", help="benchmarks/uncurated.py's --out")
    p.add_argument("--out", default="runs/open-set")
    p.add_argument("--max-nodes", type=int, default=20000)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    progress.set_quiet(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for setting in args.settings:
        rows = [run_seed(setting, s, args) for s in args.seeds]
        results[setting] = rows
        for kind in SCORES:
            cells = []
            for key in ("auroc", "fpr_at_95_tpr", "known_flagged", "unknown_flagged"):
                v = [r[kind][key] for r in rows]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                each = " ".join(f"{x:.3f}" for x in v)
                cells.append(f"{key} {each} ({np.mean(v):.3f} ± {sd:.3f})")
            print(f"{setting:8s} {kind:10s} " + " | ".join(cells), flush=True)
        for r in rows:
            if "suggest" in r:
                print(f"{setting:8s} paws suggest -n 20: {r['suggest']}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
