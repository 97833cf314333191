"""Label propagation as the teacher, and students in rounds: does the unlabelled set's graph
give the student better targets than PAWS-NN against the 100 labels?

For each round: the trunk embeddings of the labelled, unlabelled and test images; label
propagation (:func:`paws.method.diffusion.class_masses`, Zhou et al. 2004 on a 10-NN graph of
the labelled and unlabelled images, alpha 0.99, as Iscen et al. 2019 do for deep features);
the test images read by a vote of their 10 nearest unlabelled images' propagated labels
(``LP``, an inductive answer); then a student (:func:`paws.after.distill.train_student`)
trained against the propagated labels, sharpened at ``--temperature``, and tested. The next
round's teacher is that student's network. The PAWS-NN accuracy of the starting model is
printed first, to compare against.

    python benchmarks/propagated_students.py RUN_DIR/final.pt [--rounds 3] [--temperature 0.5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import paws.after.distill as distill
from paws.after.evaluate import classifier_accuracy, embed_images, paws_nn
from paws.after.saved import open_pretrained
from paws.data.loaders import Loading
from paws.method.diffusion import class_masses, knn_graph, nearest_nodes
from paws.models import Classifier


def propagated(net, opened, args) -> tuple[torch.Tensor, float]:
    """(U, K) propagated label distributions of the unlabelled images and the test accuracy
    of the inductive vote over them."""
    cfg, data, device = opened.cfg, opened.data, opened.device
    load = (cfg, Loading.of(cfg, data), device)
    lab, unl, test = (
        embed_images(net, s, *load, features="trunk")
        for s in (data.labeled, data.unlabeled, data.test)
    )
    y = torch.from_numpy(data.labeled.labels).long()
    graph = knn_graph(torch.cat([lab, unl]), args.neighbours)
    masses = class_masses(graph, torch.arange(len(lab)), y, len(data.classes), args.alpha)
    p = F.normalize(masses[len(lab) :] + 1e-12, p=1, dim=1)
    sims, index = nearest_nodes(test, unl, args.neighbours)
    vote = (sims.clamp_min(0)[..., None] ** 3 * p[index]).sum(1)
    truth = torch.from_numpy(data.test.labels).long()
    return p, 100.0 * (vote.argmax(1) == truth).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a pre-trained or tightened checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--targets", choices=["soft", "hard"], default="soft")
    parser.add_argument("--neighbours", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.99)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    opened = open_pretrained(args.checkpoint)
    cfg = opened.cfg
    cfg.distill.temperature, cfg.distill.targets = args.temperature, args.targets
    net = opened.net
    first = paws_nn(net, opened.data, cfg, opened.device)["top1"]
    print(f"PAWS-NN of the starting model: {first:.2f}%")
    for r in range(args.rounds):
        start = time.time()
        p, lp = propagated(net, opened, args)
        print(f"round {r}: LP {lp:.2f}% ({time.time() - start:.0f} s)", flush=True)
        base = copy.deepcopy(net)
        # the student is this round's teacher network, trained against the propagated labels
        distill._student = lambda c, t, a, k, b=base: Classifier.from_pretrained(b, k)
        distill.teacher_targets = lambda *a, q=p, **k: distill.sharpen_targets(
            q, cfg.distill.temperature, cfg.distill.targets, cfg.distill.threshold
        )
        start = time.time()
        student, _ = distill.train_student(
            cfg, net, opened.arch, opened.data, opened.device, progress=False
        )
        top1 = classifier_accuracy(student, opened.data, cfg, opened.device)["top1"]
        print(f"round {r}: student {top1:.2f}% ({time.time() - start:.0f} s)", flush=True)
        net = base


if __name__ == "__main__":
    main()
