"""New classes from a support set: pre-train PAWS without labels of some classes, then classify
those classes from a few labelled examples, without retraining.

Fashion-MNIST: the labelled set holds ``--labels-per-class`` images of every class except the
``--new`` ones (default: Sneaker, Bag, Ankle boot); the unlabelled set is the whole training set.
After pre-training, the support is the same number of labelled images of *every* class (the new
ones included, as a user who labels a few images of new classes would give with
``paws predict --support DIR``), and the test images are classified 10-way by soft nearest
neighbours. The same is done with the untrained encoder (same architecture, random weights) as a
reference. Prints a markdown table.

    python benchmarks/new_classes.py --steps 300 --out runs/new-classes
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from paws import runtime
    from paws.apply.load import from_checkpoint
    from paws.apply.predictor import Predictor, SoftNearestNeighbourPredictor
    from paws.apply.reading import ImageReader, Preprocessing
    from paws.config import load_config
    from paws.data import load_datasets
    from paws.models import Architecture, build_network
    from paws.pretrain.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="pre-training steps")
    p.add_argument("--new", type=int, nargs="+", default=[7, 8, 9], help="classes left unlabelled")
    p.add_argument("--labels-per-class", type=int, default=10)
    p.add_argument("--out", default="runs/new-classes", help="run directory (reused if complete)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    cfg = load_config(
        None,
        [
            f"optim.steps={args.steps}",
            f"data.labels_per_class={args.labels_per_class}",
            f"support.classes={10 - len(args.new)}",
            "tighten.after_training=false",  # the pre-trained encoder (final.pt) is measured
            *args.overrides,
        ],
    )
    device = runtime.setup(cfg)  # this script is an entry point, as the paws command
    data = load_datasets(cfg)
    support_all = data.labeled  # labels_per_class images of every class
    new = np.isin(support_all.labels, args.new)
    out = Path(args.out)
    if not (out / "final.pt").is_file():
        start = time.time()
        train(
            cfg,
            out,
            data=dataclasses.replace(data, labeled=support_all.subset(np.flatnonzero(~new))),
            device=device,
        )
        print(f"pre-trained {args.steps} steps in {time.time() - start:.0f} s", file=sys.stderr)

    test = data.test
    y = torch.from_numpy(test.labels)
    is_new = torch.from_numpy(np.isin(test.labels, args.new))
    support_images = support_all.images
    support_labels = support_all.labels

    def scores(model: Predictor) -> tuple[float, float, float]:
        model.set_support(support_images, support_labels, data.classes)
        pred = model.predict_proba(test.images).argmax(dim=1)
        hit = (pred == y).float()
        return (
            100 * float(hit[is_new].mean()),
            100 * float(hit[~is_new].mean()),
            100 * float(hit.mean()),
        )

    trained = from_checkpoint(out / "final.pt", device="cpu")
    arch = Architecture.from_config(cfg, data.channels)
    prep = Preprocessing(
        cfg.views.large_size, cfg.views.eval_crop, data.mean, data.std, data.channels
    )
    untrained = SoftNearestNeighbourPredictor(
        build_network(arch, seed=0),
        "pretrain",
        arch,
        ImageReader(prep),
        device="cpu",
        features=cfg.eval.features,
        tau=cfg.eval.tau,
    )
    names = ", ".join(data.classes[c] for c in args.new)
    print(
        f"Fashion-MNIST, {args.labels_per_class} labels per class in the support; classes "
        f"without labels in pre-training: {names}; chance 10%\n"
    )
    print("| encoder | new classes | other classes | all |")
    print("| --- | --- | --- | --- |")
    for label, model in (
        (f"PAWS, {args.steps} steps", trained),
        ("random weights", untrained),
    ):
        a, b, c = scores(model)
        print(f"| {label} | {a:.1f}% | {b:.1f}% | {c:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
