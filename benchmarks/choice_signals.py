"""What the unlabelled images say about a run's models, against what the test set says.

A run chooses its model on its labelled images (``choice.json``); on some label draws
tightening costs points the folds cannot see. This script puts beside each model of finished
run directories what a run could measure without labels, on a fixed random subset of its
unlabelled images (PAWS-NN answers against the run's labelled images; their own labels unused):

- ``tv prior``: the total variation between the predicted class shares and the class prior
  pre-training's ME-MAX aimed at (``loss.me_max_prior``: uniform by default);
- ``max share``: the largest predicted class share;
- ``agree``: the share of answers equal to the pre-trained model's;

and the test set's top-1 of each, only to judge those signals. ``--tighten-steps`` tightens the
pre-trained model again at other lengths (``tighten.steps``) and adds those models to the rows;
``--interpolate`` keeps each of them at those points between the pre-trained (0) and the SuNCEt
weights (1) (``tighten.interpolate``; default: the config's).

    python benchmarks/choice_signals.py runs/s0 runs/s1 [--tighten-steps 60] [--n 10000]
    python benchmarks/choice_signals.py runs/s0 --tighten-steps 60 --interpolate 0.25 0.5 0.75 1
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from paws import rundir
from paws.after.evaluate import paws_nn, snn_probs
from paws.after.saved import open_pretrained
from paws.after.tighten import interpolate_weights, tighten
from paws.method.priors import ClassPrior


def class_shares(probs: torch.Tensor) -> np.ndarray:
    """(K,) share of the (N, K) answers ``probs`` that fall on each class."""
    k = probs.shape[1]
    return np.bincount(probs.argmax(dim=1).numpy(), minlength=k) / len(probs)


def prior_of(cfg, data) -> np.ndarray | None:
    """(K,) the class prior ``loss.me_max_prior`` names (None for ``estimated``: the estimate
    moves during training)."""
    kind, k = cfg.loss.me_max_prior, len(data.classes)
    if kind == "estimated":
        return None
    probs = ClassPrior(kind, data.labeled.labels, k).probs  # None: the paper's uniform
    return np.full(k, 1.0 / k) if probs is None else probs.double().numpy()


def models_of(
    run: Path, opened, steps: list[int], shares: list[float] | None
) -> dict[str, torch.nn.Module]:
    """The run's pre-trained and tightened models, and the pre-trained one tightened again for
    each of ``steps``, kept at each of ``shares`` of the way to the SuNCEt weights (None: the
    config's ``tighten.interpolate``)."""
    models = {"final.pt": opened.net}
    if (run / rundir.TIGHTENED).is_file():
        models["tighten.pt"] = rundir.restore(run / rundir.TIGHTENED).net.to(opened.device)
    start = {k: v.detach().clone() for k, v in opened.net.state_dict().items()}
    for s in steps:
        cfg = copy.deepcopy(opened.cfg)
        cfg.tighten.steps, cfg.tighten.interpolate = s, 1.0
        suncet = copy.deepcopy(opened.net)
        tighten(cfg, suncet, opened.data, opened.device, evaluate=False)
        for a in shares or [opened.cfg.tighten.interpolate]:
            model = copy.deepcopy(suncet)
            interpolate_weights(model, start, a)
            models[f"tighten {s} steps, {a:g} of the way"] = model.eval()
    return models


def signals(run: Path, steps: list[int], n: int, shares: list[float] | None = None) -> list[dict]:
    """One row a model of ``run``: its test top-1 and the unlabelled images' signals."""
    opened = open_pretrained(run / rundir.FINAL, out_dir=run)
    cfg, data, device = opened.cfg, opened.data, opened.device
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(data.unlabeled), size=min(n, len(data.unlabeled)), replace=False))
    queries = data.unlabeled.subset(pick)
    prior = prior_of(cfg, data)
    choice = run / rundir.CHOICE
    chosen = json.loads(choice.read_text())["model"] if choice.is_file() else None
    rows, base = [], None
    for name, model in models_of(run, opened, steps, shares).items():
        probs = snn_probs(model, data, cfg, device, queries)
        answers = probs.argmax(dim=1)
        base = answers if base is None else base
        shares = class_shares(probs)
        test = paws_nn(model, data, cfg, device)["top1"] if data.test is not None else None
        tv = None if prior is None else 0.5 * float(np.abs(shares - prior).sum())
        rows.append(
            {
                "run": str(run),
                "model": name,
                "chosen": name == chosen,
                "test_top1": test,
                "tv_prior": tv,
                "max_share": float(shares.max()),
                "agree": float((answers == base).float().mean()),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    p.add_argument(
        "--tighten-steps", type=int, nargs="*", default=[], help="tighten again at these lengths"
    )
    p.add_argument(
        "--interpolate", type=float, nargs="*", help="shares of the way to the SuNCEt weights"
    )
    p.add_argument("--n", type=int, default=10000, help="unlabelled images scored")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    rows = [
        r for run in args.runs for r in signals(run, args.tighten_steps, args.n, args.interpolate)
    ]
    print("| run | model | test top-1 | tv prior | max share | agree | chosen |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        tv = f"{r['tv_prior']:.3f}" if r["tv_prior"] is not None else "-"
        top1 = f"{r['test_top1']:.2f}%" if r["test_top1"] is not None else "-"
        print(
            f"| {r['run']} | {r['model']} | {top1} | {tv} | {r['max_share']:.3f} | "
            f"{r['agree']:.3f} | {'yes' if r['chosen'] else ''} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
