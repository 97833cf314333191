"""Choosing images to label on synthetic embeddings where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import clusters

from paws.labelling.strategies import (
    MemmapSource,
    TensorSource,
    k_center_greedy,
    kmeans_select,
    least_margin,
    margins,
    mixed_select,
    random_select,
    unit_rows,
)
from paws.method.snn import snn_classify


@pytest.mark.parametrize("select", [kmeans_select, k_center_greedy])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_picks_one_image_of_each_well_separated_cluster(select, seed):
    # Clusters of different sizes: random picks would favour the large ones.
    x, which = clusters(8, 40, seed=seed)
    x = torch.cat([x, clusters(1, 200, seed=seed + 10)[0]])
    which = np.concatenate([which, np.full(200, 8)])
    picks = select(TensorSource(x, chunk=57), 9)
    assert sorted(which[picks].tolist()) == list(range(9))


def test_kmeans_picks_the_image_nearest_its_cluster_centre():
    x, which = clusters(3, 30, seed=4)
    picks = kmeans_select(TensorSource(x), 3)
    for p in picks:
        members = np.flatnonzero(which == which[p])
        centre = x[members].mean(dim=0)
        nearest = members[int(((x[members] - centre) ** 2).sum(dim=1).argmin())]
        assert p == nearest


@pytest.mark.parametrize("select", [kmeans_select, k_center_greedy])
def test_labelled_clusters_are_covered_already(select):
    x, which = clusters(6, 30, seed=3)
    labelled = x[[0, 30, 60]]  # one image of clusters 0, 1 and 2
    exclude = np.zeros(len(x), dtype=bool)
    exclude[[0, 30, 60]] = True
    picks = select(TensorSource(x, chunk=40), 3, labelled, exclude)
    assert sorted(which[picks].tolist()) == [3, 4, 5]


@pytest.mark.parametrize("select", [kmeans_select, k_center_greedy])
def test_chunked_and_on_disk_embeddings_give_the_same_picks_as_in_memory(select, tmp_path):
    x, _ = clusters(12, 50, dim=24, spread=0.3, seed=5)
    x = x.half().float()  # what a float16 file holds exactly
    exclude = np.zeros(len(x), dtype=bool)
    exclude[::7] = True
    whole = select(TensorSource(x, chunk=len(x)), 20, x[:5], exclude)
    chunked = select(TensorSource(x, chunk=33), 20, x[:5], exclude)
    disk = MemmapSource(tmp_path / "e.f16", len(x), x.shape[1], chunk=41, mode="w+")
    disk.write(0, x[:300])
    disk.write(300, x[300:])
    on_disk = select(
        MemmapSource(tmp_path / "e.f16", len(x), x.shape[1], chunk=41), 20, x[:5], exclude
    )
    assert whole.tolist() == chunked.tolist() == on_disk.tolist()
    assert not exclude[whole].any()
    assert len(set(whole.tolist())) == 20


def test_excluded_images_are_never_chosen_by_any_strategy():
    x, which = clusters(4, 25, seed=6)
    exclude = which == 2  # a whole cluster labelled already
    probs = torch.rand(len(x), 3)
    margin = margins(probs / probs.sum(dim=1, keepdim=True)).numpy()
    src = TensorSource(x)
    n = int((~exclude).sum())  # every image that may be chosen
    for picks in (
        kmeans_select(src, n, None, exclude),
        k_center_greedy(src, n, None, exclude),
        least_margin(margin, n, exclude),
        mixed_select(src, margin, probs.argmax(dim=1).numpy(), n, None, exclude, clusters=1),
        random_select(len(x), n, exclude),
    ):
        assert len(picks) == n
        assert sorted(picks.tolist()) == np.flatnonzero(~exclude).tolist()


def between_two_classes():
    """Supports of classes 0 and 1 at two directions, queries near each and 5 midway."""
    a, b = torch.eye(8)[0], torch.eye(8)[1]
    g = torch.Generator().manual_seed(0)
    noise = lambda n: 0.05 * torch.randn(n, 8, generator=g)  # noqa: E731
    supports = unit_rows(torch.cat([a + noise(4), b + noise(4)]))
    labels = torch.tensor([0] * 4 + [1] * 4)
    t = torch.linspace(0.45, 0.55, 5).unsqueeze(1)
    queries = unit_rows(torch.cat([a + noise(20), b + noise(20), (1 - t) * a + t * b + noise(5)]))
    return queries, supports, labels


def test_uncertainty_picks_the_images_placed_between_two_classes():
    queries, supports, labels = between_two_classes()
    probs = snn_classify(queries, supports, labels, 2, tau=0.1)
    picks = least_margin(margins(probs).numpy(), 5)
    assert sorted(picks.tolist()) == list(range(40, 45))


def test_mixed_picks_typical_images_of_each_class_uncertain_group():
    # Each of 3 classes: a confident group at its labelled images, an uncertain group leaning
    # towards the next class, and a few images on the boundary between them.
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(8)
    supports = unit_rows(
        axes[:3].repeat_interleave(2, dim=0) + 0.02 * torch.randn(6, 8, generator=g)
    )
    labels = torch.arange(3).repeat_interleave(2)
    rows, group = [], []
    for k in range(3):
        lean = 0.55 * axes[k] + 0.45 * axes[(k + 1) % 3]
        rows += [axes[k] + 0.05 * torch.randn(30, 8, generator=g)]
        rows += [lean + 0.03 * torch.randn(40, 8, generator=g)]
        rows += [axes[k] + axes[(k + 1) % 3] + 0.05 * torch.randn(3, 8, generator=g)]
        group += [f"confident {k}"] * 30 + [f"uncertain {k}"] * 40 + [f"boundary {k}"] * 3
    x = unit_rows(torch.cat(rows))
    probs = snn_classify(x, supports, labels, 3, tau=0.1)
    margin, suggested = margins(probs).numpy(), probs.argmax(dim=1).numpy()
    picks = mixed_select(TensorSource(x, chunk=50), margin, suggested, 3, supports)
    assert sorted(group[p] for p in picks) == ["uncertain 0", "uncertain 1", "uncertain 2"]
    # Typical, not extreme: none of them is among the images of smallest margin, which
    # uncertainty alone would take.
    assert not set(picks.tolist()) & set(least_margin(margin, 6).tolist())


def test_margins_of_hand_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert margins(p).tolist() == pytest.approx([0.5, 0.05])
    assert margins(torch.ones(3, 1)).tolist() == [1.0, 1.0, 1.0]


def dense_core_and_halo() -> torch.Tensor:
    """(29, 3) unit rows of one cluster: a dense core (row 0 at e1, 8 rows around it at
    0.05 rad) and a sparse halo of 20 rows 0.4-1.2 rad away on one side, which pulls the
    cluster's mean away from the core."""
    core = [[1.0, 0.0, 0.0]]
    for a in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        core.append([np.cos(0.05), np.sin(0.05) * np.cos(a), np.sin(0.05) * np.sin(a)])
    halo = []
    for i, t in enumerate(np.linspace(0.4, 1.2, 20)):
        s = 0.05 * (-1) ** i
        halo.append([np.cos(t), np.sin(t), s])
    return unit_rows(torch.tensor(core + halo, dtype=torch.float32))


def test_typiclust_picks_the_centre_of_the_dense_core_where_coverage_picks_the_halo():
    from paws.labelling.strategies import typiclust_select

    x = TensorSource(dense_core_and_halo())
    assert typiclust_select(x, 1, neighbours=8).tolist() == [0]
    # The cluster's mean lies towards the halo: the image nearest it is not in the core.
    assert kmeans_select(x, 1).tolist()[0] >= 9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_typiclust_picks_one_image_of_each_well_separated_cluster(seed):
    from paws.labelling.strategies import typiclust_select

    x, which = clusters(6, 30, seed=seed)
    picks = typiclust_select(TensorSource(x), 6, seed=seed)
    assert sorted(which[picks].tolist()) == list(range(6))


def test_typiclust_never_picks_excluded_images_and_keeps_labelled_clusters_covered():
    from paws.labelling.strategies import typiclust_select

    x, which = clusters(4, 25, seed=3)
    exclude = np.zeros(len(x), dtype=bool)
    exclude[which == 1] = True  # cluster 1 is labelled already
    labelled = x[which == 1][:3]
    picks = typiclust_select(TensorSource(x), 3, labelled, exclude)
    assert not exclude[picks].any()
    assert sorted(which[picks].tolist()) == [0, 2, 3]


def test_more_kmeans_restarts_never_end_with_a_higher_inertia():
    from paws.labelling.strategies import kmeans_clusters

    x, _ = clusters(12, 10, spread=0.3, seed=4)
    one = kmeans_clusters(TensorSource(x), 8, seed=5, iters=3).inertia
    five = kmeans_clusters(TensorSource(x), 8, seed=5, iters=3, restarts=5)
    assert five.inertia <= one
    # The kept clustering is one of the five, whole: its sizes count every row.
    assert int(five.sizes.sum()) == len(x)


def test_typiclust_takes_the_only_image_of_a_cluster_of_one():
    from paws.labelling.strategies import typiclust_select

    x, _ = clusters(2, 10, seed=6)
    far = unit_rows(torch.ones(1, x.shape[1]) * torch.tensor([(-1) ** i for i in range(16)]))
    picks = typiclust_select(TensorSource(torch.cat([x, far])), 3)
    assert len(x) in picks.tolist() and len(set(picks.tolist())) == 3
