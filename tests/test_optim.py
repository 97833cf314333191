"""LARS with classical momentum against hand computations, parameter groups, the schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from paws.method.optim import LARS, WarmupCosine, param_groups, set_lr


def _param(values: list[float], grad: list[float]) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_one_lars_step_by_hand_with_an_excluded_bias():
    w = _param([3.0, 4.0], [0.3, 0.4])  # ||w|| = 5, ||g|| = 0.5
    b = _param([1.0, -2.0], [0.5, 0.5])
    lr, wd, eta = 0.5, 0.1, 0.001
    opt = LARS(
        [
            {"params": [w], "weight_decay": wd, "lars": True},
            {"params": [b], "weight_decay": 0.0, "lars": False},
        ],
        lr=lr,
        momentum=0.9,
        trust_coefficient=eta,
        eps=0.0,
    )
    opt.step()
    # Weight: g + wd w = [0.3 + 0.3, 0.4 + 0.4] = [0.6, 0.8];
    # trust ratio = eta ||w|| / (||g|| + wd ||w||) = 0.001 * 5 / (0.5 + 0.5) = 0.005;
    # v = 0.9 * 0 - lr * 0.005 * [0.6, 0.8] = [-0.0015, -0.002]; w <- w + v.
    assert torch.allclose(w, torch.tensor([2.9985, 3.998], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        opt.state[w]["momentum_buffer"], torch.tensor([-0.0015, -0.002], dtype=torch.float64)
    )
    # Bias: no weight decay, no trust ratio: v = -0.5 * [0.5, 0.5]; b <- b + v.
    assert torch.allclose(b, torch.tensor([0.75, -2.25], dtype=torch.float64), atol=1e-12)


def test_group_weight_decay_of_excluded_group_is_not_applied():
    # Even with weight decay in the defaults, a group with weight_decay 0 and lars False gets
    # the plain gradient step.
    b = _param([2.0], [1.0])
    opt = LARS([{"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.1, weight_decay=0.5)
    opt.step()
    assert b.item() == pytest.approx(2.0 - 0.1 * 1.0)


def test_trust_ratio_falls_back_to_one_for_zero_weights():
    w = _param([0.0, 0.0], [1.0, 2.0])
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0)
    opt.step()
    assert torch.allclose(w, torch.tensor([-0.1, -0.2], dtype=torch.float64))


def _two_steps(opt: torch.optim.Optimizer, p: nn.Parameter, lrs, grads) -> list[float]:
    out = []
    for lr, g in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        out.append(p.item())
    return out


def test_classical_momentum_two_steps_by_hand():
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LARS([{"params": [p], "lars": False}], lr=0.5, momentum=0.9)
    values = _two_steps(opt, p, lrs=[0.5, 0.1], grads=[2.0, 1.0])
    # v1 = -0.5 * 2 = -1, theta1 = 1 - 1 = 0;
    # v2 = 0.9 * -1 - 0.1 * 1 = -1, theta2 = 0 - 1 = -1.
    assert values == pytest.approx([0.0, -1.0])
    # PyTorch's SGD (eq. 3: buf <- beta buf + g, theta <- theta - lr buf) differs once lr changes:
    # buf2 = 0.9 * 2 + 1 = 2.8, theta2 = 0 - 0.1 * 2.8 = -0.28.
    q = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    sgd = torch.optim.SGD([q], lr=0.5, momentum=0.9)
    assert _two_steps(sgd, q, lrs=[0.5, 0.1], grads=[2.0, 1.0]) == pytest.approx([0.0, -0.28])


def test_classical_momentum_equals_pytorch_sgd_at_constant_lr():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    lars = LARS([{"params": [a], "lars": False}], lr=0.3, momentum=0.9)
    sgd = torch.optim.SGD([b], lr=0.3, momentum=0.9)
    for _ in range(4):
        g = torch.randn(5, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    assert torch.allclose(a, b, atol=1e-12)


def test_nesterov_two_steps_by_hand():
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LARS([{"params": [p], "lars": False}], lr=0.5, momentum=0.9, nesterov=True)
    values = _two_steps(opt, p, lrs=[0.5, 0.1], grads=[2.0, 1.0])
    # v1 = -1, theta1 = 1 + 0.9 * v1 - 0.5 * 2 = -0.9;
    # v2 = 0.9 * -1 - 0.1 * 1 = -1, theta2 = -0.9 + 0.9 * v2 - 0.1 * 1 = -1.9.
    assert values == pytest.approx([-0.9, -1.9])


def test_lars_two_steps_by_hand():
    w = _param([3.0, 4.0], [0.3, 0.4])
    opt = LARS([w], lr=1.0, momentum=0.5, weight_decay=0.0, trust_coefficient=0.01, eps=0.0)
    opt.step()
    # ratio = 0.01 * 5 / 0.5 = 0.1; v1 = -1 * 0.1 * [0.3, 0.4] = [-0.03, -0.04].
    assert torch.allclose(w, torch.tensor([2.97, 3.96], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    set_lr(opt, 2.0)
    opt.step()
    # ||w|| = sqrt(2.97^2 + 3.96^2) = 4.95, ||g|| = 1, ratio = 0.0495;
    # v2 = 0.5 * [-0.03, -0.04] - 2 * 0.0495 * [0, 1] = [-0.015, -0.119].
    assert torch.allclose(w, torch.tensor([2.955, 3.841], dtype=torch.float64))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    clone = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    clone.load_state_dict(model.state_dict())
    x = torch.randn(8, 4)

    def step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    opt = LARS(param_groups(model, 1e-4), lr=0.1)
    step(model, opt)
    opt2 = LARS(param_groups(clone, 1e-4), lr=0.1)
    step(clone, opt2)
    buffer = io.BytesIO()  # as a resumed run reads it back from a checkpoint file
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    step(model, opt)
    step(clone, opt2)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_param_groups_exclude_biases_and_norm_parameters():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1, bias=False),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.LayerNorm(5),
        nn.BatchNorm1d(5),
    )
    model[0].weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, weight_decay=1e-3)
    assert len(groups) == 2
    regular, excluded = groups
    assert regular["lars"] is True and regular["weight_decay"] == 1e-3
    assert excluded["lars"] is False and excluded["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(regular["params"]) == ids([model[2].weight, model[5].weight])
    expected_excluded = [model[0].bias, model[5].bias]
    for i in (1, 3, 6, 7):
        expected_excluded += [model[i].weight, model[i].bias]
    assert ids(excluded["params"]) == ids(expected_excluded)
    # Every trainable parameter is in exactly one group.
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(regular["params"]) + len(excluded["params"]) == len(trainable)


def test_param_groups_drop_empty_groups():
    groups = param_groups(nn.Linear(3, 2, bias=False), 0.1)
    assert len(groups) == 1 and groups[0]["lars"] is True


def test_lars_rejects_bad_hyperparameters():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError):
        LARS([p], lr=-1.0)
    with pytest.raises(ValueError):
        LARS([p], lr=0.1, trust_coefficient=0.0)


# --------------------------------------------------------------------------------------------
# Schedule.


def test_warmup_cosine_key_values():
    s = WarmupCosine(start_lr=0.1, ref_lr=1.0, final_lr=0.01, warmup_steps=5, total_steps=14)
    assert s(0) == pytest.approx(0.1)
    assert s(2) == pytest.approx(0.1 + 0.9 * 2 / 5)
    assert s(5) == pytest.approx(1.0)  # end of warm-up
    # Cosine over the 8 steps 5..13: half-way (step 9) is the mean of ref and final.
    assert s(9) == pytest.approx((1.0 + 0.01) / 2)
    assert s(7) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert s(13) == pytest.approx(0.01)  # last step
    assert s(20) == pytest.approx(0.01)  # past the end stays at final_lr


def test_warmup_cosine_is_monotone():
    s = WarmupCosine(0.0, 2.0, 0.02, warmup_steps=10, total_steps=100)
    lrs = [s(t) for t in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises to ref
    assert all(a > b for a, b in zip(lrs[10:99], lrs[11:100]))  # cosine decays
    assert max(lrs) == pytest.approx(2.0) and lrs[-1] == pytest.approx(0.02)


def test_warmup_cosine_without_warmup_starts_at_ref():
    s = WarmupCosine(0.5, 1.0, 0.0, warmup_steps=0, total_steps=3)
    assert [s(0), s(1), s(2)] == pytest.approx([1.0, 0.5, 0.0])


def test_set_lr_sets_every_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = LARS([{"params": [a]}, {"params": [b], "lars": False}], lr=0.1)
    set_lr(opt, 0.7)
    assert [g["lr"] for g in opt.param_groups] == [0.7, 0.7]
