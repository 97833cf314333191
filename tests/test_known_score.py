"""The known score (method/known_score.py): scores against a plain reference, a threshold
calibrated on the labelled images, and AUROC by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paws.method.known_score import KnownScore, detection_metrics


def test_detection_metrics_hand_values():
    # Known above unknown in 3 of the 4 pairs; the 95%-TPR threshold is 0.8, which one of the
    # two unknown images reaches.
    m = detection_metrics(np.array([0.9, 0.8]), np.array([0.1, 0.85]))
    assert m["auroc"] == pytest.approx(0.75) and m["fpr_at_95_tpr"] == pytest.approx(0.5)
    assert detection_metrics(np.array([1.0, 2.0]), np.array([0.0]))["auroc"] == 1.0
    ties = detection_metrics(np.array([0.5, 0.5]), np.array([0.5, 0.5]))
    assert ties["auroc"] == pytest.approx(0.5) and ties["fpr_at_95_tpr"] == 1.0


@pytest.mark.parametrize("kind", ["soft", "nearest"])
def test_known_scores_match_a_plain_reference_in_any_chunks_and_leave_one_out(kind):
    torch.manual_seed(0)
    q, s = torch.randn(7, 5), torch.randn(11, 5)
    score = KnownScore(kind=kind, tau=0.2)
    cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(s, dim=1).T

    def reference(c: torch.Tensor) -> torch.Tensor:
        if kind == "nearest":
            return c.max(dim=1).values
        return torch.stack([0.2 * torch.log(torch.exp(row / 0.2).sum()) for row in c])

    for chunk in (1, 4, 100):
        torch.testing.assert_close(score.scores(q, s, chunk), reference(cos))
    self_cos = torch.nn.functional.normalize(s, dim=1) @ torch.nn.functional.normalize(s, dim=1).T
    others = [torch.cat([row[:i], row[i + 1 :]]) for i, row in enumerate(self_cos)]
    want = reference(torch.stack(others))
    for chunk in (1, 3, 100):
        torch.testing.assert_close(score.scores(s, s, chunk, exclude_self=True), want)


def test_the_threshold_separates_a_new_cluster_from_the_known_ones():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(8)[:3] * 10  # two known classes and one nobody labelled
    supports = torch.cat([centres[c] + torch.randn(10, 8, generator=g) for c in (0, 1)])
    known = torch.cat([centres[c] + torch.randn(50, 8, generator=g) for c in (0, 1)])
    unknown = centres[2] + torch.randn(50, 8, generator=g)
    for kind in ("soft", "nearest"):
        score = KnownScore(kind=kind, quantile=0.05)
        t = score.threshold(supports)
        s_known, s_unknown = score.scores(known, supports), score.scores(unknown, supports)
        assert (s_unknown < t).all()  # every image of the new cluster is unknown
        assert (s_known < t).float().mean() < 0.2  # few known ones are
        assert detection_metrics(s_known.numpy(), s_unknown.numpy())["auroc"] == 1.0
        # A higher quantile flags more known images.
        assert KnownScore(kind=kind, quantile=0.5).threshold(supports) > t
    assert KnownScore().threshold(supports[:1]) == float("-inf")  # one labelled image
