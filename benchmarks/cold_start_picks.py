"""Which 100 first labels, without training on them: the cold-start strategies' picks compared
on Fashion-MNIST over several k-means seeds, in minutes instead of a training per pick.

For each space (the evaluation view's pixels, and with ``--run`` the trunk of a label-free
run, ``paws train --set loss.objective=simclr``), each strategy (``coverage``: the image
nearest each k-means centre; ``typiclust``: the most typical image of each k-means cluster)
and each seed (``paws suggest --seed``), the 100 picks are scored by what needs no training:

- ``1-NN``: the test images classified by their nearest pick (cosine, in the same space),
  the picks labelled with their true classes: how well 100 labels placed there cover the
  classes;
- ``classes``: how many of the 10 classes the picks hold, and the most picks of one class;
- ``overlap``: the mean share of picks two seeds have in common (1: the picks do not move).

With ``--float16`` the same is done on the embeddings rounded to float16 (what ``paws
suggest`` stores above 250,000 images), to see whether the picks move with the precision.
The figures go to ``--out`` as JSON.

    python benchmarks/cold_start_picks.py [--run RUN_DIR] [--seeds 0 1 2 3 4] [--float16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

STRATEGIES = ("coverage", "typiclust")


def embeddings(run: str | None) -> tuple[str, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """``(space, train (N, D), test (M, D) unit rows, train labels, test labels)``, embedded as
    ``paws suggest`` embeds its pool (pixels at a cold start, the run's trunk with a run)."""
    from paws import rundir
    from paws.config import load_config
    from paws.data.loaders import Loading
    from paws.data.sources import load_datasets
    from paws.labelling.pools import no_labels
    from paws.labelling.suggest import PixelFeatures, embed_pool

    if run:
        cfg, net, _ = rundir.restore_model(run)
        space, features = "label-free trunk", "trunk"
    else:
        cfg, net = load_config(None, []), PixelFeatures()
        space, features = "pixels", "head"
    data = load_datasets(no_labels(cfg))
    loading = Loading.of(cfg, data)
    device = torch.device("cpu")
    args = (cfg, loading, device, features)
    train = embed_pool(net, data.unlabeled, *args, progress=False)
    test = embed_pool(net, data.test, *args, progress=False)
    assert data.test is not None
    return (
        space,
        train.take(np.arange(len(train))),
        test.take(np.arange(len(test))),
        np.asarray(data.labeled.labels),
        np.asarray(data.test.labels),
    )


def one_nn(test: torch.Tensor, picks: torch.Tensor, y: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 (%) of the test rows (M, D) classified by their nearest pick (P, D) (cosine),
    the picks labelled ``y`` (P,)."""
    nearest = (test @ picks.T).argmax(dim=1).numpy()
    return float((y[nearest] == test_y).mean() * 100)


def scored(test, x, picks, y, test_y) -> float:
    """1-NN top-1 (%) of the test rows against the rows ``picks`` of x, labelled by y."""
    return one_nn(test, x[torch.from_numpy(picks)], y[picks], test_y)


def score(space: str, x: torch.Tensor, test: torch.Tensor, y, test_y, seeds, n: int) -> dict:
    """Every strategy's picks over the seeds, scored (see the module's doc)."""
    from paws.labelling.strategies import TensorSource
    from paws.labelling.suggest import choose

    out = {}
    source, none = TensorSource(x), np.zeros(len(x), dtype=bool)
    for strategy in STRATEGIES:
        rows, accs, seconds = [], [], []
        for seed in seeds:
            start = time.time()
            picks, _ = choose(strategy, source, n, None, none, seed=seed)
            seconds.append(time.time() - start)
            rows.append(picks)
            accs.append(scored(test, x, picks, y, test_y))
        counts = [np.bincount(y[r], minlength=10) for r in rows]
        overlap = [len(set(a) & set(b)) / n for a, b in itertools.combinations(rows, 2)]
        out[strategy] = {
            "one_nn": accs,
            "mean": float(np.mean(accs)),
            "spread": float(np.max(accs) - np.min(accs)),
            "std": float(np.std(accs)),
            "classes": [int((c > 0).sum()) for c in counts],
            "most_of_one_class": [int(c.max()) for c in counts],
            "overlap": float(np.mean(overlap)) if overlap else 1.0,
            "seconds": float(np.mean(seconds)),
        }
        r = out[strategy]
        print(
            f"{space:<18} {strategy:<10} 1-NN mean {r['mean']:6.2f}%  spread {r['spread']:5.2f} "
            f"(min {min(accs):.2f}, max {max(accs):.2f})  classes {min(r['classes'])}-"
            f"{max(r['classes'])}  most of one class {max(r['most_of_one_class'])}  overlap "
            f"{r['overlap']:.2f}  {r['seconds']:.0f} s a pick",
            flush=True,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a label-free run directory (also scores its trunk)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("-n", type=int, default=100, help="labels to pick")
    p.add_argument("--float16", action="store_true", help="also on float16-rounded embeddings")
    p.add_argument("--skip-pixels", action="store_true", help="only the run's trunk")
    p.add_argument("--out", default="cold_start_picks.json")
    a = p.parse_args()
    torch.manual_seed(0)
    results = {}
    runs = ([] if a.skip_pixels else [None]) + ([a.run] if a.run else [])
    for run in runs:
        space, x, test, y, test_y = embeddings(run)
        results[space] = score(space, x, test, y, test_y, a.seeds, a.n)
        if a.float16:
            half = space + " float16"
            x16 = x.half().float()
            results[half] = score(half, x16, test.half().float(), y, test_y, a.seeds, a.n)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures in {a.out}")


if __name__ == "__main__":
    main()
