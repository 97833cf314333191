"""Support and unlabelled samplers: balance, uniqueness, determinism, replacement, rank shards;
through paws train, small classes said in a line and too many support classes refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import (
    expect_error,
    paws_train,
    tiny_config,
)

from paws.errors import UserError
from paws.method.sampling import SupportSampler, UnlabeledSampler


def _labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """Shuffled labels, ``per_class`` images of each of ``num_classes`` classes."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def test_global_batch_is_class_balanced_and_unique():
    labels = _labels(8, 6)
    s = SupportSampler(labels, classes_per_step=5, images_per_class=4, seed=3)
    for step in range(20):
        idx, classes = s.global_batch(step)
        assert idx.shape == (5, 4)
        assert classes.shape == (5,)
        assert len(set(classes.tolist())) == 5
        # Row c holds k images of class classes[c], and no image appears twice in a step.
        assert (labels[idx] == classes[:, None]).all()
        assert len(set(idx.ravel().tolist())) == idx.size


def test_local_batch_one_process_is_the_global_draw_with_positions():
    labels = _labels(6, 5)
    s = SupportSampler(labels, classes_per_step=4, images_per_class=3, seed=1)
    idx, classes = s.global_batch(7)
    local, pos = s.local_batch(7)
    assert np.array_equal(local, idx.reshape(-1))
    assert np.array_equal(pos, np.repeat(np.arange(4), 3))
    # Positions index the step's class list: the class at a row's position is its label.
    assert np.array_equal(classes[pos], labels[local])
    # Exactly C classes x k images each.
    assert np.array_equal(np.bincount(pos), np.full(4, 3))


def test_labels_given_as_tensor_or_list():
    labels = _labels(3, 4)
    a = SupportSampler(labels, 3, 2, seed=5)
    b = SupportSampler(torch.tensor(labels), 3, 2, seed=5)
    c = SupportSampler(labels.tolist(), 3, 2, seed=5)
    for step in range(3):
        assert np.array_equal(a.local_batch(step)[0], b.local_batch(step)[0])
        assert np.array_equal(a.local_batch(step)[0], c.local_batch(step)[0])


def test_class_ids_need_not_be_contiguous():
    labels = np.array([7] * 3 + [2] * 4 + [40] * 3)
    s = SupportSampler(labels, 3, 3, seed=0)
    idx, classes = s.global_batch(0)
    assert sorted(classes.tolist()) == [2, 7, 40]
    assert (labels[idx] == classes[:, None]).all()
    local, pos = s.local_batch(0)
    assert np.array_equal(classes[pos], labels[local])


def test_deterministic_from_seed_and_step():
    labels = _labels(10, 20)
    a = SupportSampler(labels, 6, 5, seed=11)
    b = SupportSampler(labels, 6, 5, seed=11)
    # Same step gives the same batch, whatever was drawn before (a resumed run).
    for step in (0, 5, 123, 5, 0):
        assert np.array_equal(a.global_batch(step)[0], b.global_batch(step)[0])
    assert np.array_equal(a.global_batch(9)[0], a.global_batch(9)[0])
    # Different steps and different seeds differ.
    draws = {a.global_batch(step)[0].tobytes() for step in range(10)}
    assert len(draws) == 10
    c = SupportSampler(labels, 6, 5, seed=12)
    assert not np.array_equal(a.global_batch(0)[0], c.global_batch(0)[0])


def test_replacement_across_steps():
    # 3 classes of 4 images, 2 per class per step: an image must reappear in later steps.
    labels = _labels(3, 4)
    s = SupportSampler(labels, 3, 2, seed=0)
    seen: dict[int, int] = {}
    for step in range(10):
        idx = s.local_batch(step)[0]
        assert len(set(idx.tolist())) == len(idx)
        for i in idx.tolist():
            seen[i] = seen.get(i, 0) + 1
    assert max(seen.values()) > 1
    # Over many steps every labelled image gets drawn (draws are not stuck on a subset).
    assert set(seen) == set(range(len(labels)))


def test_class_choice_varies_when_C_is_below_the_number_of_classes():
    labels = _labels(10, 3)
    s = SupportSampler(labels, 4, 2, seed=2)
    chosen = {tuple(sorted(s.global_batch(step)[1].tolist())) for step in range(30)}
    assert len(chosen) > 1
    assert set().union(*chosen) == set(range(10))


@pytest.mark.parametrize("unique_classes", [False, True])
def test_rank_shards_partition_the_global_draw(unique_classes):
    labels = _labels(8, 10)
    C, k, W = 4, 6, 2
    samplers = [
        SupportSampler(labels, C, k, seed=4, rank=r, world_size=W, unique_classes=unique_classes)
        for r in range(W)
    ]
    for step in (0, 1, 17):
        idx, classes = samplers[0].global_batch(step)
        locals_ = [s.local_batch(step) for s in samplers]
        # Every rank computes the same global draw without talking.
        for s in samplers[1:]:
            assert np.array_equal(s.global_batch(step)[0], idx)
        all_idx = np.concatenate([li for li, _ in locals_])
        assert len(all_idx) == C * k
        assert len(set(all_idx.tolist())) == C * k  # no overlap between ranks
        assert set(all_idx.tolist()) == set(idx.ravel().tolist())
        for li, pos in locals_:
            assert len(li) == C * k // W
            assert np.array_equal(classes[pos], labels[li])
        if unique_classes:
            # Each rank loads C/W whole classes, k images each; ranks' classes are disjoint.
            per_rank = [set(classes[pos].tolist()) for _, pos in locals_]
            assert all(len(c) == C // W for c in per_rank)
            assert not per_rank[0] & per_rank[1]
            for _, pos in locals_:
                assert np.array_equal(np.bincount(pos, minlength=C)[np.unique(pos)], [k, k])
        else:
            # Each rank sees every class with k/W images.
            for _, pos in locals_:
                assert np.array_equal(np.bincount(pos, minlength=C), np.full(C, k // W))


@pytest.mark.parametrize("unique_classes", [False, True])
@pytest.mark.parametrize("views", [1, 2])
def test_gathered_positions_match_each_ranks_rows(unique_classes, views):
    labels = _labels(6, 8)
    C, k, W = 6, 4, 2 if not unique_classes else 3
    samplers = [
        SupportSampler(labels, C, k, seed=9, rank=r, world_size=W, unique_classes=unique_classes)
        for r in range(W)
    ]
    step = 3
    _, classes = samplers[0].global_batch(step)
    # Simulate the all-gather: each rank stacks [view 1 rows; view 2 rows; ...] of its images.
    gathered_labels = []
    for s in samplers:
        idx, pos = s.local_batch(step)
        assert np.array_equal(pos, s.positions(s.rank))
        gathered_labels.append(np.tile(labels[idx], views))
    gathered_labels = np.concatenate(gathered_labels)
    for s in samplers:
        gp = s.gathered_positions(views)
        assert len(gp) == C * k * views
        assert np.array_equal(classes[gp], gathered_labels)
        assert np.array_equal(np.bincount(gp), np.full(C, k * views))


def test_classes_of_one_and_two_images_repeat_them_evenly_and_say_so(capsys):
    labels = np.array([0] * 6 + [1] * 1 + [2] * 2)
    s = SupportSampler(labels, 3, 5, seed=4, class_names=["cat", "dog", "bird"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'dog' (1)" in err and "'bird' (2)" in err
    assert "support.images_per_class (5)" in err and "'cat'" not in err
    for step in range(10):
        idx, classes = s.global_batch(step)
        assert idx.shape == (3, 5)
        for row, c in zip(idx, classes):
            assert (labels[row] == c).all()
            counts = np.bincount(row, minlength=len(labels))[labels == c]
            if c == 0:
                assert counts.max() == 1  # a class with enough images: k distinct
            else:  # every image of a small class appears, as often as the others to within one
                assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    # A class with enough images draws exactly what it drew before small classes existed.
    big = SupportSampler(np.array([0] * 6 + [1] * 6 + [2] * 6), 3, 5, seed=4)
    assert not capsys.readouterr().err  # nothing to say
    assert big.global_batch(0)[0].shape == (3, 5)


def test_fewer_mode_gives_small_classes_once():
    labels = np.array([0] * 6 + [1] * 1 + [2] * 2)
    s = SupportSampler(labels, 3, 4, seed=1, fill=False)
    local, pos = s.local_batch(3)
    _, classes = s.global_batch(3)
    assert np.array_equal(classes[pos], labels[local])
    assert sorted(np.bincount(pos).tolist()) == [1, 2, 4]
    assert len(set(local.tolist())) == len(local)  # no image twice


def test_more_classes_than_labelled_is_one_line_error():
    labels = _labels(4, 3)
    with pytest.raises(UserError) as e:
        SupportSampler(labels, 5, 2)
    msg = str(e.value)
    assert "\n" not in msg
    assert "support.classes is 5" in msg and "only 4 classes" in msg and "at most 4" in msg


def test_shard_divisibility_and_sizes_are_errors():
    labels = _labels(4, 6)
    with pytest.raises(UserError, match="images_per_class \\(3\\) must be divisible by the 2"):
        SupportSampler(labels, 4, 3, world_size=2)
    with pytest.raises(UserError, match="classes \\(3\\) must be divisible by the 2"):
        SupportSampler(labels, 3, 2, world_size=2, unique_classes=True)
    with pytest.raises(UserError, match="at least 1"):
        SupportSampler(labels, 0, 2)
    with pytest.raises(UserError, match="at least 1"):
        SupportSampler(labels, 2, 0)


# --------------------------------------------------------------------------------------------
# Unlabelled batches.


def test_unlabeled_epoch_covers_each_image_at_most_once():
    n, b = 23, 5
    s = UnlabeledSampler(n, b, seed=1)
    assert s.steps_per_epoch == 4
    for epoch in range(3):
        batch = np.concatenate(
            [s.local_batch(epoch * s.steps_per_epoch + i) for i in range(s.steps_per_epoch)]
        )
        assert len(batch) == 20
        assert len(set(batch.tolist())) == 20
        assert batch.min() >= 0 and batch.max() < n
    # A fresh permutation each epoch.
    e0 = np.concatenate([s.local_batch(i) for i in range(4)])
    e1 = np.concatenate([s.local_batch(4 + i) for i in range(4)])
    assert not np.array_equal(e0, e1)


def test_unlabeled_deterministic_in_any_order():
    a, b = UnlabeledSampler(40, 8, seed=3), UnlabeledSampler(40, 8, seed=3)
    forward = [a.local_batch(step) for step in range(12)]
    backward = [b.local_batch(step) for step in reversed(range(12))][::-1]
    for x, y in zip(forward, backward):
        assert np.array_equal(x, y)
    c = UnlabeledSampler(40, 8, seed=4)
    assert not np.array_equal(a.local_batch(0), c.local_batch(0))


def test_unlabeled_rank_slices_are_disjoint_and_make_the_global_batch():
    n, b, W = 30, 6, 3
    ranks = [UnlabeledSampler(n, b, seed=2, rank=r, world_size=W) for r in range(W)]
    single = UnlabeledSampler(n, b, seed=2)
    for step in range(8):
        parts = [r.local_batch(step) for r in ranks]
        assert all(len(p) == b // W for p in parts)
        joined = np.concatenate(parts)
        assert len(set(joined.tolist())) == b
        assert np.array_equal(joined, single.local_batch(step))


def test_unlabeled_errors():
    with pytest.raises(UserError, match="divisible"):
        UnlabeledSampler(100, 10, world_size=3)
    with pytest.raises(UserError, match="fewer than"):
        UnlabeledSampler(5, 8)


def test_class_with_fewer_than_k_labelled_images_trains_and_says_so(
    folder, tmp_path, capsys, monkeypatch
):
    for p in sorted((folder / "dog").iterdir())[1:]:
        p.unlink()  # one labelled dog
    cfg = tiny_config(folder, "support.images_per_class=4")
    code, out, err = paws_train(tmp_path, capsys, monkeypatch, cfg, quiet=False)
    assert code == 0, err
    assert "1 labelled class has fewer images than support.images_per_class (4): 'dog' (1)" in err
    assert "run saved in" in out


def test_more_support_classes_than_classes(folder, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(folder, "support.classes=5")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == (
        "support.classes is 5 but the labelled set has only 3 classes; set support.classes "
        "to at most 3"
    )
