"""PAWS-NN against the supervised-only baseline on Fashion-MNIST, same labels and budget.

For each seed, runs the default recipe (``paws train``, 10 labels per class) and
``paws baseline`` on the same labelled images, then prints both test accuracies, their gap and
the wall-clock times, and with several seeds their means and spreads. A seed sets both the
draw of the 100 labelled images (``data.split_seed``) and the initialisation, batches and
augmentations (``run.seed``): a user's labels are one draw among many, and from one draw to
another the accuracy moves by more than a point, so one draw alone says little. With
``--same-labels`` only ``run.seed`` changes (the labels of ``data.split_seed`` 0). Extra
``--set`` options apply to both runs.

    python benchmarks/fashion_mnist.py [--out runs/bench] [--seeds 0 1 2] [--set key=value ...]

Each seed's runs go to ``OUT/seed<N>``; a seed whose runs finished is read back, not rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str]) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "paws", "--quiet", *args], check=True)
    return time.time() - start


def one_seed(out: Path, common: list[str], seed: int, same_labels: bool) -> tuple[float, ...]:
    """Train and run the baseline with seed ``seed`` into ``out``; print and return the
    PAWS-NN top-1 after pre-training and after tightening, and the baseline's."""
    args = [*common, "--set", f"run.seed={seed}"]
    if not same_labels:
        args += ["--set", f"data.split_seed={seed}"]
    t_paws = t_base = 0.0
    if not (out / "eval.json").is_file():
        t_paws = run(["train", "--out", str(out), *args])
    if not (out / "baseline.json").is_file():
        t_base = run(["baseline", "--out", str(out), *args])
    paws = json.loads((out / "eval.json").read_text())
    base = json.loads((out / "baseline.json").read_text())
    before = paws.get("pretrained")
    tightened = f", {before['top1']:.2f}% before tightening" if before else ""
    print(f"seed {seed}" + ("" if same_labels else f" (label draw {seed})"))
    print(
        f"  PAWS-NN            top-1 {paws['top1']:6.2f}%  "
        f"({t_paws / 60:.1f} min incl. eval{tightened})"
    )
    print(
        f"  supervised only    top-1 {base['top1']:6.2f}%  ({t_base / 60:.1f} min, "
        f"{base['steps']} steps on {base['num_labeled']} labelled images)"
    )
    print(f"  PAWS-NN - baseline {paws['top1'] - base['top1']:+6.2f} points", flush=True)
    pre = before["top1"] if before else paws["top1"]
    return pre, paws["top1"], base["top1"]


def _mean_spread(xs: list[float]) -> str:
    spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):6.2f}% ± {spread:.2f} (min {min(xs):.2f}, max {max(xs):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=f"runs/bench-fashion-mnist-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--config", default=None, help="config file or recipe (default: the default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (label draws)")
    p.add_argument("--same-labels", action="store_true", help="vary run.seed only")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    common = (["--config", a.config] if a.config else []) + [
        x for o in a.overrides for x in ("--set", o)
    ]
    results = [one_seed(Path(a.out) / f"seed{s}", common, s, a.same_labels) for s in a.seeds]
    if len(results) > 1:
        pre, paws, base = ([r[i] for r in results] for i in range(3))
        gaps = [x - y for x, y in zip(paws, base)]
        print(f"mean ± standard deviation over {len(results)} seeds")
        print(f"  PAWS-NN after pre-training {_mean_spread(pre)}")
        print(f"  PAWS-NN (paws train)       {_mean_spread(paws)}")
        print(f"  supervised only            {_mean_spread(base)}")
        per_seed = ", ".join(f"{g:+.2f}" for g in gaps)
        print(f"  PAWS-NN - baseline {statistics.mean(gaps):+6.2f} points (per seed: {per_seed})")


if __name__ == "__main__":
    main()
