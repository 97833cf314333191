"""Several processes give the same step as one process holding the global batch.

A real 2-process run (gloo on CPU, spawned here) takes PAWS steps on its shards of a global
batch and must match one process on the whole batch: the loss, the parameter update and the
batch-norm statistics, to 1e-5. That checks together the supports gathered with their gradients,
ME-MAX averaged across ranks, global batch norm and DDP's gradient averaging.

In float32 (the training dtype) the two sum in different orders, and this small network
amplifies the rounding in its gradients (to about 1e-4 after a step, as permuting the support
rows in one process also does), so the float32 check is one step. In float64 the model, the
update and the gradients agree to 1e-5 over two steps (the loss itself is computed in float32),
which shows that what differs is rounding, not the method.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from paws import distributed
from paws.config import load_config
from paws.data import Batch, Datasets, ImageSet, step_batches
from paws.method.losses import smooth_labels
from paws.method.optim import LARS, param_groups
from paws.method.priors import ClassPrior
from paws.method.sampling import SupportSampler, UnlabeledSampler
from paws.models import Architecture, build_network
from paws.pretrain.step import ropaws_of, train_step

WORLD = 2
STEPS = {torch.float32: 1, torch.float64: 2}
VIEWS = 2  # support views
CLASSES, PER_CLASS, LABELED_PER_CLASS = 4, 4, 6
BATCH, UNLABELED = 8, 16

CFG = load_config(
    None,
    [
        "model.width=4",
        "model.proj_hidden=16",
        "model.proj_out=8",
        "model.pred_head=true",
        "model.pred_hidden=16",
        f"support.classes={CLASSES}",
        f"support.images_per_class={PER_CLASS}",
        f"support.views={VIEWS}",
        f"optim.batch_size={BATCH}",
        # A trust coefficient large enough that the update is far above the tolerance.
        "optim.trust_coefficient=0.02",
    ],
)


# RoPAWS (its label propagation spans both processes' images) with a given ME-MAX prior, and
# the estimated prior's running mass.
ROPAWS_CFG = load_config(
    None,
    [
        *[
            f"{k}={v}"
            for k, v in (
                ("model.width", 4),
                ("model.proj_hidden", 16),
                ("model.proj_out", 8),
                ("model.pred_head", "true"),
                ("model.pred_hidden", 16),
                ("support.classes", CLASSES),
                ("support.images_per_class", PER_CLASS),
                ("support.views", VIEWS),
                ("optim.batch_size", BATCH),
                ("optim.trust_coefficient", 0.02),
            )
        ],
        "loss.ropaws=true",
        "loss.ropaws_prior_tau=0.5",
        "loss.me_max_prior=[0.4,0.3,0.2,0.1]",
    ],
)


def _global_data(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fixed 'augmented views' of every image: the same tensors in every process."""
    g = torch.Generator().manual_seed(1)
    n_lab = CLASSES * LABELED_PER_CLASS
    return {
        "labels": torch.arange(CLASSES).repeat_interleave(LABELED_PER_CLASS),
        "support_views": torch.randn(VIEWS, n_lab, 1, 12, 12, generator=g, dtype=dtype),
        "large": torch.randn(2, UNLABELED, 1, 12, 12, generator=g, dtype=dtype),
        "small": torch.randn(2, UNLABELED, 1, 8, 8, generator=g, dtype=dtype),
    }


def _steps(unique_classes: bool, dtype: torch.dtype = torch.float32, cfg=CFG) -> dict[str, object]:
    """STEPS PAWS steps on this process's shard; collectives are no-ops in one process."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    d = _global_data(dtype)
    unl = UnlabeledSampler(UNLABELED, BATCH, seed=3, rank=rank, world_size=world)
    sup = SupportSampler(d["labels"], CLASSES, PER_CLASS, 3, rank, world, unique_classes)
    labels = smooth_labels(torch.from_numpy(sup.gathered_positions(VIEWS)), CLASSES, 0.1)

    torch.manual_seed(0)
    model = build_network(Architecture.from_config(CFG, 1)).to(dtype)
    model = distributed.convert_batchnorm(model, torch.device("cpu"))
    net = distributed.data_parallel(model, torch.device("cpu"))
    optimizer = LARS(
        param_groups(model, CFG.optim.weight_decay),
        lr=0.1,
        momentum=CFG.optim.momentum,
        trust_coefficient=CFG.optim.trust_coefficient,
    )
    out: dict[str, object] = {"initial": {k: v.clone() for k, v in model.state_dict().items()}}
    for step in range(STEPS[dtype]):
        i = torch.from_numpy(unl.local_batch(step))
        s = torch.from_numpy(sup.local_batch(step)[0])
        views = [d["large"][0][i], d["large"][1][i], d["small"][0][i], d["small"][1][i]]
        supports = torch.cat([d["support_views"][v][s] for v in range(VIEWS)])
        classes = torch.from_numpy(sup.global_batch(step)[1])
        prior = ClassPrior(cfg.loss.me_max_prior, d["labels"].numpy(), CLASSES).for_step(classes)
        batch = Batch(step, views, supports)
        r = train_step(net, optimizer, batch, labels, cfg.loss, ropaws_of(cfg.loss), prior=prior)
        out[f"scalars{step}"] = r.read()
        out[f"grads{step}"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[f"state{step}"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _positions(unique_classes: bool) -> dict[str, np.ndarray]:
    """Support labels after a real all-gather, next to what the sampler says they are."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    labels = np.repeat(np.arange(5), 4)  # 5 classes of 4 images
    sup = SupportSampler(labels, 4, 2, 7, rank, world, unique_classes)
    got: dict[str, list[np.ndarray]] = {"positions": [], "class_ids": [], "indices": []}
    for step in range(3):
        idx, pos = sup.local_batch(step)
        for key, local in (
            ("positions", np.tile(pos, VIEWS)),
            ("class_ids", np.tile(labels[idx], VIEWS)),
            ("indices", np.tile(idx, VIEWS)),
        ):
            gathered = distributed.all_gather(torch.from_numpy(local))
            got[key].append(gathered.numpy())
    return {k: np.stack(v) for k, v in got.items()}


def _helpers() -> dict[str, object]:
    """Rows gathered from uneven shards (3 rows on rank 0, 5 on rank 1) and gradients
    averaged over ranks (rank r holds r + 1 everywhere; a bias without a gradient)."""
    rank = distributed.get_rank()
    rows = torch.arange(3 + 2 * rank, dtype=torch.float32) * 10 + rank
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.full_like(layer.weight, float(rank + 1))
    distributed.average_gradients(layer.parameters())
    return {
        "gathered": distributed.gather_rows(torch.stack([rows, -rows], dim=1)),
        "weight_grad": layer.weight.grad.clone(),
        "bias_grad": layer.bias.grad,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    try:
        result = {
            "steps": {(u, t): _steps(u, t) for u in (False, True) for t in STEPS},
            "positions": {u: _positions(u) for u in (False, True)},
            "ropaws": _steps(False, torch.float64, ROPAWS_CFG),
            "helpers": _helpers(),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of 2 real processes computed (spawned once for the module)."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 240 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(STEPS), ids=["float32", "float64"])
@pytest.mark.parametrize("unique_classes", [False, True], ids=["split-images", "split-classes"])
def test_two_processes_take_the_one_process_step(
    two_ranks: list[dict], unique_classes: bool, dtype: torch.dtype
):
    torch.set_num_threads(1)
    ref = _steps(unique_classes, dtype)  # this process has no process group: one process
    for rank, got in enumerate(r["steps"][unique_classes, dtype] for r in two_ranks):
        for name, v in ref["initial"].items():
            assert torch.equal(got["initial"][name], v), f"rank {rank} starts elsewhere: {name}"
        before, got_before = ref["initial"], got["initial"]
        for step in range(STEPS[dtype]):
            for key, value in ref[f"scalars{step}"].items():
                assert got[f"scalars{step}"][key] == pytest.approx(value, abs=1e-5), (rank, key)
            if dtype == torch.float64:
                for name, g in ref[f"grads{step}"].items():
                    torch.testing.assert_close(got[f"grads{step}"][name], g, atol=1e-5, rtol=1e-5)
            after, got_after = ref[f"state{step}"], got[f"state{step}"]
            for name, value in after.items():
                if name.endswith("num_batches_tracked"):
                    assert torch.equal(got_after[name], value)
                    continue
                # The update (parameters) and the new batch-norm statistics (buffers).
                torch.testing.assert_close(
                    got_after[name] - got_before[name],
                    value - before[name],
                    atol=1e-5,
                    rtol=0,
                )
            before, got_before = after, got_after


def test_updates_are_large_enough_to_tell_apart():
    """The 1e-5 tolerance above is meaningful: the step moves weights by far more."""
    torch.set_num_threads(1)
    ref = _steps(False)
    moved = max(
        float((ref["state0"][n] - ref["initial"][n]).abs().max())
        for n, _ in build_network(Architecture.from_config(CFG, 1)).named_parameters()
    )
    assert moved > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("unique_classes", [False, True], ids=["split-images", "split-classes"])
def test_gathered_support_labels_match_the_images(two_ranks: list[dict], unique_classes: bool):
    labels = np.repeat(np.arange(5), 4)
    sampler = SupportSampler(labels, 4, 2, 7, 0, WORLD, unique_classes)
    expected = sampler.gathered_positions(VIEWS)
    for got in (r["positions"][unique_classes] for r in two_ranks):
        for step in range(3):
            idx, classes = sampler.global_batch(step)
            assert np.array_equal(got["positions"][step], expected)
            # Position p of the step's class list is dataset class classes[p].
            assert np.array_equal(got["class_ids"][step], classes[expected])
            # Every image of the global draw once per view, none twice.
            assert sorted(got["indices"][step]) == sorted(np.tile(idx.reshape(-1), VIEWS))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("unique_classes", [False, True], ids=["split-images", "split-classes"])
def test_gathered_positions_layout(world: int, unique_classes: bool):
    """Ranks' shares stacked as an all-gather would, for more ranks than we can spawn here."""
    labels = np.repeat(np.arange(6), 5)
    samplers = [SupportSampler(labels, 4, 4, 11, r, world, unique_classes) for r in range(world)]
    idx, classes = samplers[0].global_batch(5)
    gathered_idx, gathered_pos = [], []
    for s in samplers:
        i, p = s.local_batch(5)
        gathered_idx.append(np.tile(i, 2))
        gathered_pos.append(np.tile(p, 2))
        assert np.array_equal(idx.reshape(-1)[s.shard_rows()], i)
    positions = samplers[0].gathered_positions(2)
    assert np.array_equal(np.concatenate(gathered_pos), positions)
    assert np.array_equal(labels[np.concatenate(gathered_idx)], classes[positions])
    assert np.bincount(positions).tolist() == [2 * 4] * 4


def test_views_do_not_depend_on_the_number_of_processes():
    """Each image gets the same augmented views whichever process holds it."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 6)
    images = ImageSet(
        labels=labels,
        names=[str(i) for i in range(len(labels))],
        images=torch.from_numpy(rng.integers(0, 255, (len(labels), 1, 14, 14), dtype=np.uint8)),
    )
    data = Datasets(images, images, None, ["a", "b", "c"], 1, (0.5,), (0.25,))
    cfg = load_config(
        None,
        [
            "views.large_size=12",
            "views.small_size=8",
            "views.small_crops=2",
            "views.blur_prob=0.5",
            "optim.batch_size=8",
            "support.classes=3",
            "support.images_per_class=4",
        ],
    )

    def batches(rank: int, world: int) -> list[Batch]:
        unl = UnlabeledSampler(len(labels), 8, 0, rank, world)
        sup = SupportSampler(labels, 3, 4, 0, rank, world)
        return list(step_batches(data, cfg, unl, sup, range(3), torch.device("cpu")))

    one = batches(0, 1)
    for world in (2, 4):
        shards = [batches(r, world) for r in range(world)]
        for step in range(3):
            for v in range(4):
                joined = torch.cat([s[step].views[v] for s in shards])
                # Equal up to rounding (the blur's convolution sums by batch size).
                torch.testing.assert_close(joined, one[step].views[v], atol=1e-6, rtol=0)
            # Supports: (views * n, ...) per process, rows at SupportSampler.shard_rows.
            full = one[step].supports.view(2, 12, 1, 12, 12)
            for r, s in enumerate(shards):
                rows = SupportSampler(labels, 3, 4, 0, r, world).shard_rows()
                local = s[step].supports.view(2, len(rows), 1, 12, 12)
                torch.testing.assert_close(local, full[:, rows], atol=1e-6, rtol=0)
        assert not torch.equal(one[step].views[0], one[step].views[1])


@pytest.mark.slow
def test_two_processes_take_the_one_process_ropaws_step_with_a_prior(two_ranks: list[dict]):
    torch.set_num_threads(1)
    ref = _steps(False, torch.float64, ROPAWS_CFG)
    plain = _steps(False, torch.float64)
    # RoPAWS and the prior change the step (else this test could not fail).
    assert ref["scalars0"]["loss"] != pytest.approx(plain["scalars0"]["loss"], abs=1e-4)
    for rank, got in enumerate(r["ropaws"] for r in two_ranks):
        for step in range(STEPS[torch.float64]):
            for key, value in ref[f"scalars{step}"].items():
                assert got[f"scalars{step}"][key] == pytest.approx(value, abs=1e-6), (rank, key)
            for name, g in ref[f"grads{step}"].items():
                torch.testing.assert_close(got[f"grads{step}"][name], g, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_uneven_rows_are_gathered_and_gradients_averaged(two_ranks: list[dict]):
    rows = torch.cat([torch.arange(3.0) * 10, torch.arange(5.0) * 10 + 1])
    expected = torch.stack([rows, -rows], dim=1)
    for rank in two_ranks:
        h = rank["helpers"]
        assert torch.equal(h["gathered"], expected)
        assert torch.equal(h["weight_grad"], torch.full((1, 2), 1.5))  # (1 + 2) / 2
        assert h["bias_grad"] is None


def test_local_batchnorm_keeps_the_weights_and_the_answers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), distributed.GlobalBatchNorm(3), torch.nn.Flatten(0, -1)
    )
    head = distributed.GlobalBatchNorm(4)
    with torch.no_grad():
        for bn in (model[1], head):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
    x, z = torch.randn(5, 1, 6, 6), torch.randn(7, 4)
    for original in (model, head):
        local = distributed.local_batchnorm(original)
        kinds = {type(m) for m in local.modules()}
        assert distributed.GlobalBatchNorm not in kinds
        assert local.state_dict().keys() == original.state_dict().keys()
        for key, value in original.state_dict().items():
            assert torch.equal(local.state_dict()[key], value)
    for original, data in ((model, x), (head, z)):
        for training in (False, True):
            original.train(training)
            local = distributed.local_batchnorm(original)
            assert local.training == training
            assert torch.allclose(local(data), original(data), atol=1e-6)
