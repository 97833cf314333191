"""PAWS-NN against the supervised-only baseline on Fashion-MNIST, same labels and budget.

For each seed (``run.seed``: initialisation, batches and augmentations; the labelled images
stay the same), runs the default recipe (``paws train``, 10 labels per class) and
``paws baseline`` on the same labelled images for the same number of steps, then prints both
test accuracies, their gap and the wall-clock times, and with several seeds their means: from
one seed to another the gap moves by more than a point, so one seed alone says little. Extra
``--set`` options apply to both runs.

    python benchmarks/fashion_mnist.py [--out runs/bench] [--seeds 0 1 2] [--set key=value ...]

Each seed's runs go to ``OUT/seed<N>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str]) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "paws", "--quiet", *args], check=True)
    return time.time() - start


def one_seed(out: Path, common: list[str], seed: int) -> tuple[float, float]:
    """Train and run the baseline with ``run.seed=seed`` into ``out``; print and return the
    (PAWS-NN, baseline) top-1 accuracies."""
    args = [*common, "--set", f"run.seed={seed}"]
    t_paws = run(["train", "--out", str(out), *args])
    t_base = run(["baseline", "--out", str(out), *args])
    paws = json.loads((out / "eval.json").read_text())
    base = json.loads((out / "baseline.json").read_text())
    before = paws.get("pretrained")
    tightened = f", {before['top1']:.2f}% before tightening" if before else ""
    print(f"seed {seed}")
    print(
        f"  PAWS-NN            top-1 {paws['top1']:6.2f}%  "
        f"({t_paws / 60:.1f} min incl. eval{tightened})"
    )
    print(
        f"  supervised only    top-1 {base['top1']:6.2f}%  ({t_base / 60:.1f} min, "
        f"{base['steps']} steps on {base['num_labeled']} labelled images)"
    )
    print(f"  PAWS-NN - baseline {paws['top1'] - base['top1']:+6.2f} points", flush=True)
    return paws["top1"], base["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=f"runs/bench-fashion-mnist-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--config", default=None, help="config file or recipe (default: the default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run.seed values")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    common = (["--config", a.config] if a.config else []) + [
        x for o in a.overrides for x in ("--set", o)
    ]
    results = [one_seed(Path(a.out) / f"seed{s}", common, s) for s in a.seeds]
    if len(results) > 1:
        paws = sum(r[0] for r in results) / len(results)
        base = sum(r[1] for r in results) / len(results)
        gaps = ", ".join(f"{r[0] - r[1]:+.2f}" for r in results)
        print(f"mean of {len(results)} seeds")
        print(f"  PAWS-NN            top-1 {paws:6.2f}%")
        print(f"  supervised only    top-1 {base:6.2f}%")
        print(f"  PAWS-NN - baseline {paws - base:+6.2f} points (per seed: {gaps})")


if __name__ == "__main__":
    main()
