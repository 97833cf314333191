"""The fast paths compute what the plain ones do: speed never changes a result."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from paws.config import load_config
from paws.data.transforms import ShardGenerator, _on_rows, color_distort
from paws.method.losses import snn
from paws.method.optim import LARS, param_groups
from paws.method.snn import snn_classify
from paws.models import Architecture, build_network


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lars", [True, False])
def test_lars_fused_update_equals_the_per_parameter_loop(nesterov: bool, lars: bool):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.width=4", "model.proj_hidden=16", "model.proj_out=8"])
    loop_model = build_network(Architecture.from_config(cfg, 1))
    fused_model, initial = copy.deepcopy(loop_model), copy.deepcopy(loop_model)
    optimizers = []
    for model, foreach in ((loop_model, False), (fused_model, True)):
        groups = param_groups(model, weight_decay=1e-3)
        for g in groups:
            g["lars"] = g["lars"] and lars
        optimizers.append(
            LARS(groups, lr=0.3, trust_coefficient=0.02, nesterov=nesterov, foreach=foreach)
        )
    for _ in range(3):
        x = torch.randn(8, 1, 12, 12)
        for model, opt in zip((loop_model, fused_model), optimizers):
            opt.zero_grad()
            model([x])[1].square().mean().backward()
            opt.step()
    moved = 0.0
    with torch.no_grad():
        for a, b, c in zip(loop_model.parameters(), fused_model.parameters(), initial.parameters()):
            torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6)
            # The same optimizer state, so checkpoints carry over between the two.
            torch.testing.assert_close(
                optimizers[1].state[b]["momentum_buffer"],
                optimizers[0].state[a]["momentum_buffer"],
                atol=1e-7,
                rtol=1e-6,
            )
            moved = max(moved, float((a - c).abs().max()))
    assert moved > 1e-3


def test_lars_mixed_dtypes_fall_back_to_the_loop():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = LARS([{"params": [a, b], "lars": False}], lr=0.5, momentum=0.0)
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((2,), 4.0, dtype=torch.float64)
    opt.step()
    assert torch.equal(a.detach(), torch.zeros(3))
    assert torch.equal(b.detach(), torch.full((2,), -1.0, dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_chunked_snn_classify_equals_snn(tau: float):
    torch.manual_seed(0)
    q, s = torch.randn(300, 16), torch.randn(1000, 16)
    y = torch.randint(0, 7, (1000,))
    expected = snn(q, s, F.one_hot(y, 7).float(), tau)
    got = snn_classify(q, s, y, 7, tau, chunk_size=128, query_batch=64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_shard_generator_draws_the_global_batch_rows():
    total, rows = 10, torch.tensor([3, 4, 5])
    got = ShardGenerator(torch.Generator().manual_seed(0), total, rows).rand(6)
    full = torch.rand(2, total, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, full[:, rows].reshape(-1))
    with pytest.raises(ValueError):
        ShardGenerator(torch.Generator(), total, rows).rand(4)


def test_row_subsets_by_index_and_by_selection_agree():
    """On a GPU, colour ops run on every row and select (no device sync); on the CPU, on the
    chosen rows only. Both give the same batch."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    chosen = torch.rand(16) < 0.5
    shift = torch.rand(16)

    def fn(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return rows * s.view(-1, 1, 1, 1)

    by_index = _on_rows(x, chosen, shift, fn)
    by_selection = torch.where(chosen.view(-1, 1, 1, 1), fn(x, shift), x)
    assert torch.equal(by_index, by_selection)
    assert not torch.equal(by_index, x)
    out = color_distort(x, 0.5, gen=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1


def _one_step(channels_last: bool, dtype: torch.dtype | None) -> tuple[dict, torch.nn.Module]:
    from paws.data import Batch
    from paws.method.losses import smooth_labels
    from paws.pretrain.step import train_step

    cfg = load_config(None, ["model.width=4", "model.proj_hidden=16", "model.proj_out=8"])
    torch.manual_seed(0)
    model = build_network(Architecture.from_config(cfg, 1))
    model.channels_last = channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = LARS(param_groups(model, 1e-6), lr=0.1, trust_coefficient=0.02)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 1, 12, 12, generator=g) for _ in range(2)]
    views += [torch.randn(8, 1, 8, 8, generator=g) for _ in range(2)]
    supports = torch.randn(12, 1, 12, 12, generator=g)
    labels = smooth_labels(torch.arange(12) % 3, 3, 0.1)
    r = train_step(model, opt, Batch(0, views, supports), labels, cfg.loss, dtype=dtype)
    assert r.loss.dtype == torch.float32  # the loss is computed in float32 in any case
    return r.read(), model


def test_channels_last_takes_the_same_step():
    (plain, m1), (last, m2) = _one_step(False, None), _one_step(True, None)
    assert last["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), atol=1e-5, rtol=0)


def test_bfloat16_autocast_keeps_the_loss_in_float32_and_close():
    """The mixed-precision path (on a GPU: bf16 or fp16 autocast) on the CPU's autocast."""
    (plain, _), (mixed, _) = _one_step(False, None), _one_step(False, torch.bfloat16)
    assert mixed["loss"] == pytest.approx(plain["loss"], abs=5e-2)
    assert mixed["loss"] != plain["loss"]  # the forward did run in bfloat16


@pytest.mark.parametrize("size", [8, 28])
def test_crop_grid_equals_affine_grid(size: int):
    from paws.data.transforms import _crop_grid

    g = torch.Generator().manual_seed(0)
    sx, sy, cx, cy = (torch.rand(5, generator=g) * 2 - 1 for _ in range(4))
    theta = torch.zeros(5, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    expected = F.affine_grid(theta, [5, 1, size, size], align_corners=False)
    torch.testing.assert_close(_crop_grid(sx, sy, cx, cy, size), expected, atol=1e-6, rtol=0)
