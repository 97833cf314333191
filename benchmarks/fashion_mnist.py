"""PAWS-NN against the supervised-only baseline on Fashion-MNIST, same labels and budget.

Runs the default recipe (``paws train``, 10 labels per class) and ``paws baseline`` on the same
labelled images for the same number of steps, then prints both test accuracies, their gap and
the wall-clock times. Extra ``--set`` options apply to both runs.

    python benchmarks/fashion_mnist.py [--out runs/bench] [--set key=value ...]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=f"runs/bench-fashion-mnist-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--config", default=None, help="config file or recipe (default: the default)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    out = Path(a.out)
    common = (["--config", a.config] if a.config else []) + [
        x for o in a.overrides for x in ("--set", o)
    ]
    t_paws = run(["train", "--out", str(out), *common])
    t_base = run(["baseline", "--out", str(out), *common])
    paws = json.loads((out / "eval.json").read_text())
    base = json.loads((out / "baseline.json").read_text())
    print(f"PAWS-NN            top-1 {paws['top1']:6.2f}%  ({t_paws / 60:.1f} min incl. eval)")
    print(
        f"supervised only    top-1 {base['top1']:6.2f}%  ({t_base / 60:.1f} min, "
        f"{base['steps']} steps on {base['num_labeled']} labelled images)"
    )
    print(f"PAWS-NN - baseline {paws['top1'] - base['top1']:+6.2f} points")


if __name__ == "__main__":
    main()
