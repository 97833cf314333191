"""The config's sections for the steps after pre-training: the supervised baseline,
fine-tuning (Appendix A), tightening (Appendix C) and the student."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from paws.config.fields import MAX_BATCH, MAX_EPOCHS, MAX_STEPS, knob as _f

__all__ = ["BaselineConfig", "FinetuneConfig", "TightenConfig", "DistillConfig"]


@dataclass
class BaselineConfig:
    epochs: float | None = _f(
        None,
        "supervised-only baseline length in epochs over the labelled set (default: the same "
        "number of steps as PAWS, and at least min_epochs)",
        (0.0, MAX_EPOCHS),
    )
    min_epochs: float = _f(
        100,
        "by default the baseline trains at least this many epochs over the labelled images, "
        "so that a small labelled set is fitted, not stopped early",
        (0.0, MAX_EPOCHS),
    )
    batch_size: int = _f(128, "labelled images per step", (1, MAX_BATCH))
    lr: float = _f(
        0.1, "learning rate (SGD, classical Nesterov momentum, cosine decay)", (0.0, None)
    )
    weight_decay: float = _f(5e-4, "weight decay", (0.0, 1.0))
    time_limit: float | None = _f(
        None, "stop after this many seconds (same wall-clock budget)", (0.0, None)
    )


@dataclass
class FinetuneConfig:
    lrs: list[float] = _f(
        [0.01, 0.02, 0.05, 0.1, 0.2], "learning rates swept (Appendix A; each > 0)"
    )
    epochs: list[int] = _f([30, 50], "epoch counts swept (Appendix A; each >= 1)")
    batch_size: int = _f(
        256, "labelled images per step (paper: 1024; at most the labelled set)", (2, MAX_BATCH)
    )
    val_fraction: float = _f(
        0.2,
        "fraction of each labelled class held out to choose the setting (never the test set); "
        "0 only with a single setting",
        (0.0, 0.9),
    )


@dataclass
class TightenConfig:
    after_training: bool = _f(
        True,
        "paws train ends by tightening (Appendix C's CIFAR-10 protocol) and reports PAWS-NN "
        "before and after; the tightened model is tighten.pt",
    )
    steps: int = _f(
        60,
        "SuNCEt fine-tuning steps (Appendix C's CIFAR-10 protocol has 180 with 400 labels a "
        "class; with 10 a class, 180 learn them by heart: 60 did better on 9 of 10 label "
        "draws, benchmarks/RESULTS.md)",
        (1, MAX_STEPS),
    )
    classes: int = _f(10, "classes per batch (at most the labelled classes)", (2, 1_000_000))
    images_per_class: int = _f(
        64,
        "distinct images per class per batch, at least 2: SuNCEt pulls each image towards "
        "another of its class, and with 1 no image has one (a class with fewer gives all it has)",
        (2, 1_000_000),
    )
    lr: float = _f(0.1, "learning rate at step 0, cosine decay to 0", (0.0, None))
    momentum: float = _f(0.9, "classical momentum (no weight decay)", (0.0, 0.9999))
    lars: bool = _f(
        True,
        "LARS adaptation of the weights (trust coefficient optim.trust_coefficient), as the "
        "official code; off: plain momentum SGD, which needs a far smaller lr",
    )
    tau: float = _f(0.1, "SuNCEt temperature", (1e-4, 10.0))
    interpolate: float = _f(
        0.5,
        "tighten.pt keeps (1 - a) x the pre-trained weights + a x the weights SuNCEt reached "
        "(WiSE-FT's weight interpolation): 0.5 was within 0.2 points of the better of the two "
        "on 9 of 9 label draws and above both on 8 (benchmarks/RESULTS.md); 1: the SuNCEt "
        "weights alone, as the paper",
        (0.0, 1.0),
    )


@dataclass
class DistillConfig:
    after_training: bool = _f(
        False,
        "paws train ends by training a student classifier on every unlabelled image against "
        "the teacher's PAWS-NN probabilities (distill.pt), a candidate of the run's choice",
    )
    epochs: float = _f(2.0, "passes over the unlabelled images", (0.01, 10_000.0))
    batch_size: int = _f(256, "unlabelled images per step", (2, MAX_BATCH))
    labeled_batch: int = _f(
        64, "labelled images per step, with their labels (at most the labelled set)", (0, MAX_BATCH)
    )
    labeled_weight: float = _f(
        1.0, "weight of the labelled images' cross-entropy beside the unlabelled", (0.0, None)
    )
    lr: float = _f(0.05, "learning rate at step 0, cosine decay to 0 (Nesterov SGD)", (0.0, None))
    targets: Literal["soft", "hard"] = _f(
        "soft",
        "soft: cross-entropy to the teacher's probabilities (SimCLRv2's distillation); hard: "
        "to their arg-max (pseudo-labels)",
    )
    temperature: float = _f(
        1.0,
        "the teacher's probabilities sharpened as p^(1/T), renormalised (1: as they are)",
        (1e-3, 100.0),
    )
    threshold: float = _f(
        0.0,
        "unlabelled images whose teacher's top probability is below this are left out "
        "(FixMatch's confidence mask; 0: every image)",
        (0.0, 1.0),
    )
    init: Literal["teacher", "scratch"] = _f(
        "teacher",
        "the student starts from the teacher's trunk and first head layer, or from new weights "
        "of the same architecture",
    )
    checkpoint_every: int = _f(
        200, "steps between the student's resumable checkpoints (distill.last.pt)", (1, MAX_STEPS)
    )
