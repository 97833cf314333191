"""Which 100 labels: chosen by ``paws suggest`` against drawn at random, on Fashion-MNIST.

Every arm labels 100 training images in total, trains the default recipe (``paws train``) and is
scored by PAWS-NN on the test set as ``paws train`` reports it (after tightening):

- A: 100 images drawn uniformly at random (``data.num_labels=100``): what a user can do;
- B: 10 a class at random (the default): a balance no user can draw without the labels;
- C: a cold start, ``paws suggest -n 100`` with no run;
- D: two rounds, a cold start of 50, train, ``paws suggest RUN -n 50``, then train again from
  round 1's weights (``paws train --init``, ``--round2-epochs`` of schedule);
- Dscratch: D's 100 labels trained from scratch with the default recipe;
- Ccov, Ctyp: the cold start of C by coverage k-means and by TypiClust (``--strategy
  coverage``/``typiclust``), on pixels;
- E: a label-free round (``paws train --set loss.objective=simclr``, no labels: S), then
  ``paws suggest S -n 100`` in its embedding (TypiClust, the cold-start default) and ``paws
  train --init S`` with those labels; Ecov: the same with coverage; Escratch: E's labels
  trained from scratch (what the embedding's picks are worth without its weights).

The label-free round S is made once a seed and shared by the E arms; its minutes count in
theirs.

The labels of suggested images come from the dataset's true labels, as a person labelling them
would give. ``--seeds`` sets ``run.seed``, ``data.split_seed`` and ``paws suggest --seed``.
Every step writes into ``OUT/seed<N>/``; a run or a file that is already complete is not made
again, so the benchmark can be run piecewise (``--seeds``, ``--arms``) and resumed. The figures
go to ``OUT/results.json``; each run prints its seeds, means and minutes, then the same before
tightening (PAWS-NN of ``last.pt``).

    python benchmarks/label_selection.py --out runs/labels [--seeds 0 1 2] [--arms A B C D]
    python benchmarks/label_selection.py --seeds 0 --arms C D --set optim.steps=100   # a check
    python benchmarks/label_selection.py --arms A Ccov Ctyp E Ecov Escratch   # the cold starts
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("A", "B", "C", "D", "Dscratch", "Ccov", "Ctyp", "E", "Ecov", "Escratch")
NAMES = {
    "A": "100 uniformly at random",
    "B": "10 a class at random",
    "C": "cold-start paws suggest -n 100",
    "D": "2 rounds of 50, round 2 --init",
    "Dscratch": "D's 100 labels, from scratch",
    "Ccov": "cold start, coverage on pixels",
    "Ctyp": "cold start, typiclust on pixels",
    "E": "label-free round, typiclust, --init",
    "Ecov": "label-free round, coverage, --init",
    "Escratch": "E's 100 labels, from scratch",
}


def paws(args: list[str]) -> float:
    """Run ``paws --quiet ARGS``; returns its minutes."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "paws", "--quiet", *args], check=True)
    return (time.time() - start) / 60


def true_labels(root: str | None) -> tuple[list[int], list[str]]:
    """Fashion-MNIST's training labels (the person labelling) and its class names."""
    from paws.data import load_fashion_mnist
    from paws.data.builtin import FASHION_MNIST_CLASSES

    train, _ = load_fashion_mnist(root)
    return [int(y) for y in train.labels], list(FASHION_MNIST_CLASSES)


def fill(suggested: Path, out: Path, labels: tuple[list[int], list[str]]) -> None:
    """Fill the label column of a suggestion file with the true labels (paths are indices)."""
    y, classes = labels
    with open(suggested, newline="") as f:
        rows = list(csv.reader(f))
    head, body = rows[0], rows[1:]
    p, lab = head.index("path"), head.index("label")
    for r in body:
        r[lab] = classes[y[int(r[p])]]
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([head, *body])


def concat(parts: list[Path], out: Path) -> None:
    """One labels file of several (the header once)."""
    rows = []
    for i, part in enumerate(parts):
        with open(part, newline="") as f:
            table = list(csv.reader(f))
        rows += table if i == 0 else table[1:]
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)


class Bench:
    """The runs of one seed, each made once (its minutes kept in ``OUT/results.json``)."""

    def __init__(self, out: Path, seed: int, common: list[str], labels: tuple, results: dict):
        self.dir, self.seed, self.common = out / f"seed{seed}", seed, common
        self.labels, self.results = labels, results
        self.times = results.setdefault("minutes", {}).setdefault(str(seed), {})
        self.dir.mkdir(parents=True, exist_ok=True)

    def train(self, name: str, *args: str) -> Path:
        run = self.dir / name
        if not (run / "eval.json").is_file():
            again = ["--resume", str(run)] if (run / "config.yaml").is_file() else []
            where = again or ["--out", str(run)]
            seeds = ["--set", f"run.seed={self.seed}", "--set", f"data.split_seed={self.seed}"]
            self.times[name] = paws(["train", *where, *self.common, *seeds, *args])
        return run

    def label_free(self) -> Path:
        """The seed's label-free round (no labels: ``loss.objective=simclr``), made once."""
        run = self.dir / "S"
        if not (run / "final.pt").is_file():
            again = ["--resume", str(run)] if (run / "config.yaml").is_file() else []
            where = again or ["--out", str(run)]
            seeds = ["--set", f"run.seed={self.seed}", "--set", "loss.objective=simclr"]
            self.times["S"] = paws(["train", *where, *self.common, *seeds])
        return run

    def suggest(self, name: str, n: int, *args: str) -> Path:
        filled = self.dir / f"{name}.csv"
        if not filled.is_file():
            raw = self.dir / f"{name}-suggested.csv"
            raw.unlink(missing_ok=True)
            self.times[name] = paws(
                ["suggest", *args, "-n", str(n), "--out", str(raw), "--seed", str(self.seed)]
            )
            fill(raw, filled, self.labels)
        return filled

    def minutes(self, *names: str) -> float:
        return sum(self.times.get(n, float("nan")) for n in names)

    def arm(self, arm: str, a: argparse.Namespace) -> tuple[Path, float]:
        """Run an arm; returns its scored run and its minutes."""
        if arm == "A":
            return self.train("A", "--set", "data.num_labels=100"), self.minutes("A")
        if arm == "B":
            return self.train("B"), self.minutes("B")
        if arm == "C":
            labels = self.suggest("C-labels", 100)
            run = self.train("C", "--set", f"data.labels_file={labels}")
            return run, self.minutes("C-labels", "C")
        if arm in ("Ccov", "Ctyp"):
            how = {"Ccov": "coverage", "Ctyp": "typiclust"}[arm]
            labels = self.suggest(f"{arm}-labels", 100, "--strategy", how, "--features", "pixels")
            run = self.train(arm, "--set", f"data.labels_file={labels}")
            return run, self.minutes(f"{arm}-labels", arm)
        if arm in ("E", "Ecov", "Escratch"):
            s = self.label_free()
            how = "coverage" if arm == "Ecov" else "typiclust"
            name = "Ecov-labels" if arm == "Ecov" else "E-labels"
            labels = self.suggest(name, 100, str(s), "--strategy", how)
            init = [] if arm == "Escratch" else ["--init", str(s)]
            run = self.train(arm, *init, "--set", f"data.labels_file={labels}")
            return run, self.minutes("S", name, arm)
        first = self.suggest("D-labels1", 50)
        r1 = self.train("D-round1", "--set", f"data.labels_file={first}")
        second = self.suggest("D-labels2", 50, str(r1), "--strategy", a.strategy)
        both = self.dir / "D-labels.csv"
        concat([first, second], both)
        both_set = ["--set", f"data.labels_file={both}"]
        head = self.minutes("D-labels1", "D-round1", "D-labels2")
        if arm == "D":
            epochs = ["--set", f"optim.epochs={a.round2_epochs}"] if a.round2_epochs else []
            run = self.train("D-round2", "--init", str(r1), *both_set, *epochs)
            return run, head + self.minutes("D-round2")
        return self.train("Dscratch", *both_set), head + self.minutes("Dscratch")


def summarise(scores: dict[str, dict[str, float]], minutes: dict[str, dict[str, float]]) -> None:
    """Print every seed, the means, and the differences the targets are about."""
    means = {}
    print(f"{'arm':<10} {'what':<34} " + " ".join(f"seed {s:>3}" for s in sorted(_seeds(scores))))
    for arm, per in scores.items():
        cells = " ".join(f"{per[s]:7.2f}%" if s in per else "       –" for s in _seeds(scores))
        means[arm] = sum(per.values()) / len(per)
        mins = minutes.get(arm, {})
        took = f"  ({sum(mins.values()) / len(mins):.1f} min a seed)" if mins else ""
        print(f"{arm:<10} {NAMES[arm]:<34} {cells}  mean {means[arm]:6.2f}%{took}")
    pairs = (
        ("D", "A", 4),
        ("D", "B", 1.5),
        ("C", "A", 3),
        ("Dscratch", "A", 3),
        ("Ctyp", "Ccov", 0),
        ("E", "A", 3),
        ("E", "C", 0),
        ("E", "Escratch", 0),
    )
    for a, b, target in pairs:
        if a in means and b in means:
            print(f"{a} - {b}: {means[a] - means[b]:+.2f} points (target > {target})")


def _seeds(scores: dict[str, dict[str, float]]) -> list[str]:
    return sorted({s for per in scores.values() for s in per}, key=int)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-label-selection", help="where the runs go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--strategy", default="coverage", help="paws suggest strategy of round 2")
    p.add_argument(
        "--round2-epochs",
        type=float,
        default=None,
        help="optim.epochs of D's round 2 from round 1's weights (default: the recipe's)",
    )
    p.add_argument("--root", help="Fashion-MNIST folder (data.root), if not the default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [x for o in a.overrides for x in ("--set", o)]
    if a.root:
        common += ["--set", f"data.root={a.root}"]
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    results.setdefault("settings", {})[" ".join(sys.argv[1:])] = {
        "overrides": a.overrides,
        "strategy": a.strategy,
        "round2_epochs": a.round2_epochs,
    }
    labels = true_labels(a.root)
    for seed in a.seeds:
        bench = Bench(out, seed, common, labels, results)
        for arm in a.arms:
            run, minutes = bench.arm(arm, a)
            ev = json.loads((run / "eval.json").read_text())
            results.setdefault("top1", {}).setdefault(arm, {})[str(seed)] = ev["top1"]
            before = ev.get("pretrained", {}).get("top1")
            if before is not None:  # PAWS-NN of last.pt, before tightening
                results.setdefault("pretrained_top1", {}).setdefault(arm, {})[str(seed)] = before
            results.setdefault("arm_minutes", {}).setdefault(arm, {})[str(seed)] = minutes
            saved.write_text(json.dumps(results, indent=2) + "\n")
            print(f"seed {seed} {arm:<9} top-1 {ev['top1']:.2f}%  ({minutes:.1f} min)", flush=True)
    summarise(
        {arm: results["top1"][arm] for arm in ARMS if arm in results.get("top1", {})},
        results.get("arm_minutes", {}),
    )
    if results.get("pretrained_top1"):
        print("\nPAWS-NN before tightening (last.pt):")
        before = results["pretrained_top1"]
        summarise({arm: before[arm] for arm in ARMS if arm in before}, {})
    print(f"figures in {saved}")


if __name__ == "__main__":
    main()
