"""The PAWS objective against hand-computed values, properties and a loop-based reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from paws.method.losses import (
    RoPAWS,
    me_max_term,
    nt_xent,
    paws_loss,
    ropaws_predictions,
    sharpen,
    smooth_labels,
    snn,
    supervised_nce,
)


def test_sharpen_hand_value():
    out = sharpen(torch.tensor([[0.75, 0.25]]), T=0.5)
    assert torch.allclose(out, torch.tensor([[0.9, 0.1]]), atol=1e-6)


def test_sharpen_identity_at_T1_and_keeps_zeros():
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    assert torch.allclose(sharpen(p, T=1.0), p, atol=1e-6)
    assert torch.equal(sharpen(p, T=0.25)[1], torch.tensor([1.0, 0.0, 0.0]))


def test_snn_hand_value():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    supports = torch.cat([e1, e2])
    labels = torch.eye(2)
    p = snn(e1, supports, labels, tau=1.0)
    a = math.e / (math.e + 1)
    assert torch.allclose(p, torch.tensor([[a, 1 - a]]), atol=1e-4)
    assert torch.allclose(p, torch.tensor([[0.7311, 0.2689]]), atol=1e-4)


def test_snn_normalises_embeddings():
    supports = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p1 = snn(torch.tensor([[3.0, 1.0]]), supports * 7, torch.eye(2), tau=0.5)
    p2 = snn(torch.tensor([[0.3, 0.1]]), supports, torch.eye(2), tau=0.5)
    assert torch.allclose(p1, p2, atol=1e-6)


def test_smooth_labels_hand_value():
    out = smooth_labels(torch.tensor([0, 2]), num_classes=3, smoothing=0.1)
    on, off = 0.9 + 0.1 / 3, 0.1 / 3
    expected = torch.tensor([[on, off, off], [off, off, on]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_paws_loss_hand_computed_two_views():
    # One image, two views equal to the two support embeddings; tau = 1, T = 0.5, no smoothing.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    views = torch.stack([e1, e2])
    supports, labels = torch.stack([e1, e2]), torch.eye(2)
    ce, reg = paws_loss(views, supports, labels, views, supports, labels, tau=1.0, T=0.5)
    a = math.e / (math.e + 1)  # p(view 1) = [a, 1 - a], p(view 2) = [1 - a, a]
    s = a**2 / (a**2 + (1 - a) ** 2)  # sharpened: rho(p1) = [s, 1 - s], rho(p2) = [1 - s, s]
    # view 1's target is rho(p2), view 2's target is rho(p1)
    ce1 = -((1 - s) * math.log(a) + s * math.log(1 - a))
    ce2 = -(s * math.log(1 - a) + (1 - s) * math.log(a))
    assert ce.item() == pytest.approx((ce1 + ce2) / 2, abs=1e-5)
    # mean sharpened anchor prediction is [0.5, 0.5]: sum(pbar log pbar) = -log 2
    assert reg.item() == pytest.approx(-math.log(2), abs=1e-5)


def test_paws_loss_hand_computed_small_view_targets_mean_of_large():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    small = torch.tensor([1.0, 1.0])  # equidistant: p(small) = [0.5, 0.5]
    anchors = torch.stack([e1, e2, small])
    supports, labels = torch.stack([e1, e2]), torch.eye(2)
    ce, _ = paws_loss(
        anchors, supports, labels, anchors[:2], supports, labels, tau=1.0, T=0.5, me_max=False
    )
    a = math.e / (math.e + 1)
    s = a**2 / (a**2 + (1 - a) ** 2)
    ce_large = -((1 - s) * math.log(a) + s * math.log(1 - a))
    ce_small = -(0.5 * math.log(0.5) + 0.5 * math.log(0.5))  # target = mean = [0.5, 0.5]
    assert ce.item() == pytest.approx((2 * ce_large + ce_small) / 3, abs=1e-5)


def reference_paws_loss(anchors, a_sup, a_lab, targets, t_sup, t_lab, tau, T, me_max=True):
    """Deliberately plain loops over the equations of the paper (eq. 4)."""

    def predict(z, sup, lab):
        zn = z / z.norm()
        sims = [torch.dot(zn, s / s.norm()) / tau for s in sup]
        w = torch.softmax(torch.stack(sims), dim=0)
        return sum(w[j] * lab[j] for j in range(len(sup)))

    def rho(p):
        q = p ** (1.0 / T)
        return q / q.sum()

    n_t = targets.shape[0] // 2
    views = anchors.shape[0] // n_t
    with torch.no_grad():
        rho_t = [rho(predict(targets[i], t_sup, t_lab)) for i in range(2 * n_t)]
    total, probs = 0.0, []
    for v in range(views):
        for i in range(n_t):
            p = predict(anchors[v * n_t + i], a_sup, a_lab)
            probs.append(p)
            if v == 0:
                target = rho_t[n_t + i]
            elif v == 1:
                target = rho_t[i]
            else:
                target = 0.5 * (rho_t[i] + rho_t[n_t + i])
            total = total - (target * torch.log(p)).sum()
    ce = total / (views * n_t)
    pbar = torch.stack([rho(p) for p in probs]).mean(0)
    reg = (pbar * torch.log(pbar)).sum() if me_max else torch.zeros(())
    return ce, reg


@pytest.mark.parametrize("small_views", [0, 6])
@pytest.mark.parametrize("me_max", [True, False])
def test_paws_loss_matches_loop_reference_values_and_gradients(small_views, me_max):
    torch.manual_seed(small_views + 10 * me_max)
    B, D, K, k = 3, 5, 4, 2
    anchors = torch.randn((2 + small_views) * B, D, dtype=torch.float64, requires_grad=True)
    supports = torch.randn(K * k, D, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(2 * B, D, dtype=torch.float64)
    t_sup = torch.randn(K * k, D, dtype=torch.float64)
    labels = smooth_labels(torch.arange(K).repeat_interleave(k), K, 0.1).double()

    ce, reg = paws_loss(
        anchors, supports, labels, targets, t_sup, labels, tau=0.1, T=0.25, me_max=me_max
    )
    g_anchor, g_sup = torch.autograd.grad(ce + reg, [anchors, supports])

    a2, s2 = anchors.detach().clone().requires_grad_(), supports.detach().clone().requires_grad_()
    ce_ref, reg_ref = reference_paws_loss(a2, s2, labels, targets, t_sup, labels, 0.1, 0.25, me_max)
    ref_a, ref_s = torch.autograd.grad(ce_ref + reg_ref, [a2, s2])
    assert ce.item() == pytest.approx(ce_ref.item(), abs=1e-6)
    assert reg.item() == pytest.approx(reg_ref.item(), abs=1e-6)
    assert torch.allclose(g_anchor, ref_a, atol=1e-6)
    assert torch.allclose(g_sup, ref_s, atol=1e-6)


def test_targets_carry_no_gradient_and_supports_get_gradient():
    torch.manual_seed(0)
    anchors = torch.randn(8, 4, requires_grad=True)
    supports = torch.randn(6, 4, requires_grad=True)
    targets = torch.randn(4, 4, requires_grad=True)
    t_sup = torch.randn(6, 4, requires_grad=True)
    labels = smooth_labels(torch.arange(3).repeat_interleave(2), 3, 0.1)
    ce, reg = paws_loss(anchors, supports, labels, targets, t_sup, labels)
    (ce + reg).backward()
    assert targets.grad is None and t_sup.grad is None
    assert supports.grad is not None and supports.grad.abs().sum() > 0
    assert anchors.grad is not None and anchors.grad.abs().sum() > 0


def test_shared_embeddings_as_targets_are_detached():
    """Passing the anchors' own large-view rows as targets: only the anchor path has gradient."""
    torch.manual_seed(1)
    z = torch.randn(4, 3, requires_grad=True)
    supports = torch.randn(4, 3)
    labels = torch.eye(2).repeat_interleave(2, dim=0)
    ce, _ = paws_loss(z, supports, labels, z, supports, labels, me_max=False)
    (g,) = torch.autograd.grad(ce, z)
    z_target = z.detach().clone()
    ce2, _ = paws_loss(z, supports, labels, z_target, supports, labels, me_max=False)
    (g2,) = torch.autograd.grad(ce2, z)
    assert torch.allclose(g, g2)


def test_predictions_are_distributions():
    torch.manual_seed(2)
    labels = smooth_labels(torch.arange(5).repeat_interleave(3), 5, 0.1)
    p = snn(torch.randn(7, 8), torch.randn(15, 8), labels, tau=0.1)
    assert torch.all(p >= 0)
    assert torch.allclose(p.sum(1), torch.ones(7), atol=1e-6)
    q = sharpen(p, 0.25)
    assert torch.allclose(q.sum(1), torch.ones(7), atol=1e-6)


def test_collapse_gives_uniform_prediction_and_nonzero_gradient():
    """Proposition 1: with class-balanced supports, collapsed representations predict the
    uniform distribution while the sharpened targets are not uniform, so training moves away.

    At an *exactly* collapsed point every cosine similarity sits at its maximum, so the
    first-order change through the normalisation vanishes; the test therefore also starts a
    hair away from collapse and checks the gradient is non-zero and gradient steps spread the
    predictions away from uniform."""
    K, k, D = 4, 3, 6
    labels = smooth_labels(torch.arange(K).repeat_interleave(k), K, 0.1)
    centre = torch.ones(1, D)
    p = snn(centre.repeat(10, 1), centre.repeat(K * k, 1), labels, tau=0.1)
    assert torch.allclose(p, torch.full_like(p, 1 / K), atol=1e-6)

    torch.manual_seed(3)
    views = (centre + 1e-2 * torch.randn(10, D)).requires_grad_()
    supports = (centre + 1e-2 * torch.randn(K * k, D)).requires_grad_()
    target_views, target_supports = torch.randn(10, D), torch.randn(K * k, D)
    start_p = snn(views, supports, labels, 0.1).detach()
    assert (start_p - 1 / K).abs().max() < 0.02  # still essentially uniform
    opt = torch.optim.SGD([views, supports], lr=1.0)
    for i in range(50):
        ce, reg = paws_loss(views, supports, labels, target_views, target_supports, labels)
        opt.zero_grad()
        (ce + reg).backward()
        if i == 0:
            assert views.grad.norm() + supports.grad.norm() > 1e-3
        opt.step()
    end_p = snn(views, supports, labels, 0.1).detach()
    assert (end_p - 1 / K).abs().max() > 5 * (start_p - 1 / K).abs().max()


def test_me_max_is_minus_log_k_for_uniform_and_zero_for_one_class():
    uniform = torch.full((6, 4), 0.25)
    assert me_max_term(uniform, T=0.25).item() == pytest.approx(-math.log(4), abs=1e-6)
    one = torch.tensor([[1.0, 0.0, 0.0]] * 5)
    assert me_max_term(one, T=0.25).item() == pytest.approx(0.0, abs=1e-6)


def test_total_loss_can_be_negative():
    e = torch.eye(3)
    labels = torch.eye(3)
    views = torch.cat([e, e]) * 1.0
    ce, reg = paws_loss(views, e, labels, views, e, labels, tau=0.05)
    assert (ce + reg).item() < 0


def test_confident_predictions_stay_finite():
    torch.manual_seed(4)
    z = torch.randn(12, 8, requires_grad=True)
    supports = torch.randn(6, 8, requires_grad=True)
    labels = torch.eye(3).repeat_interleave(2, dim=0)  # no smoothing: exact zeros
    ce, reg = paws_loss(z, supports, labels, z[:4], supports, labels, tau=1e-3, T=0.1)
    g = torch.autograd.grad(ce + reg, [z, supports])
    assert torch.isfinite(ce) and torch.isfinite(reg)
    assert all(torch.isfinite(x).all() for x in g)


def test_loss_is_fp32_under_autocast():
    torch.manual_seed(5)
    z = torch.randn(8, 16)
    s = torch.randn(6, 16)
    labels = smooth_labels(torch.arange(3).repeat_interleave(2), 3, 0.1)
    ref = paws_loss(z, s, labels, z[:4], s, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = paws_loss(z.bfloat16(), s.bfloat16(), labels, z[:4].bfloat16(), s.bfloat16(), labels)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[0].item() == pytest.approx(ref[0].item(), abs=0.05)


def test_paws_loss_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="target_views"):
        paws_loss(
            torch.randn(5, 3),
            torch.randn(2, 3),
            torch.eye(2),
            torch.randn(4, 3),
            torch.randn(2, 3),
            torch.eye(2),
        )


def test_supervised_nce_and_nt_xent_prefer_aligned_embeddings():
    labels = torch.eye(2).repeat_interleave(2, dim=0)
    tight = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.01, 1.0]])
    assert supervised_nce(tight, labels) < supervised_nce(mixed, labels)
    a = torch.eye(4)
    assert nt_xent(a, a) < nt_xent(a, a.flip(0))


def test_supervised_nce_scores_only_the_rows_asked_for():
    torch.manual_seed(0)
    z = torch.randn(5, 4)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2]), 3).float()
    rows = torch.tensor([True, True, True, True, False])  # class 2 has a single image
    full = supervised_nce(z, labels, 0.5)
    part = supervised_nce(z, labels, 0.5, rows)
    # Loop reference: each scored row against every other row.
    zn = torch.nn.functional.normalize(z, dim=1)
    terms = []
    for i in range(4):
        w = torch.stack(
            [torch.exp(zn[i] @ zn[j] / 0.5) if j != i else torch.tensor(0.0) for j in range(5)]
        )
        terms.append(-torch.log((w * labels[:, labels[i].argmax()]).sum() / w.sum()))
    assert part.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert full.item() != pytest.approx(part.item(), rel=1e-3)


# --------------------------------------------------------------------------------------------
# ME-MAX with a prior, and RoPAWS.


def test_me_max_with_a_prior_is_kl_to_it_hand_values():
    half = torch.full((3, 2), 0.5)  # sharpening leaves 0.5/0.5, so pbar = [0.5, 0.5]
    kl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # 0.2231
    assert me_max_term(half, 0.25, prior=torch.tensor([0.8, 0.2])).item() == pytest.approx(kl)
    # A uniform prior is the paper's term plus log K.
    uniform = me_max_term(half, 0.25, prior=torch.tensor([0.5, 0.5])).item()
    assert uniform == pytest.approx(me_max_term(half, 0.25).item() + math.log(2), abs=1e-7)
    assert uniform == pytest.approx(0.0, abs=1e-7)


def reference_ropaws_targets(views, supports, labels, tau, prior_tau, label_ratio):
    """Plain loops: kernel weights per pair, then label propagation by fixed-point iteration
    (P <- A_L Y + A_U P), not a linear solve."""
    m, n, k = views.shape[0], supports.shape[0], labels.shape[1]

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    a_l = torch.zeros(m, n, dtype=torch.float64)
    a_u = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        to_s = [cos(views[i], supports[j]) for j in range(n)]
        prior = math.exp((max(to_s) - 1) / prior_tau)
        w_s = [label_ratio * m / n * math.exp(c / tau) for c in to_s]
        w_u = [math.exp(cos(views[i], views[j]) / tau) if j != i else 0.0 for j in range(m)]
        z = sum(w_s) + sum(w_u)
        for j in range(n):
            a_l[i, j] = prior * w_s[j] / z
        for j in range(m):
            a_u[i, j] = prior * w_u[j] / z
    p = torch.zeros(m, k, dtype=torch.float64)
    for _ in range(500):
        p = a_l @ labels.double() + a_u @ p
    p_in = p.sum(dim=1)
    return p + (1 - p_in).unsqueeze(1) / k, p_in


def reference_ropaws_loss(anchors, a_sup, a_lab, targets, t_sup, t_lab, tau, T, r):
    """RoPAWS's loss in loops: each large view's targets from the batch of that view."""

    def predict(z, sup, lab):
        zn = z / z.norm()
        w = torch.softmax(torch.stack([torch.dot(zn, s / s.norm()) / tau for s in sup]), 0)
        return sum(w[j] * lab[j] for j in range(len(sup)))

    def rho(p):
        q = p ** (1.0 / T)
        return q / q.sum()

    b = targets.shape[0] // 2
    views = anchors.shape[0] // b
    per_view = [
        reference_ropaws_targets(
            targets[v * b : (v + 1) * b], t_sup, t_lab, tau, r.prior_tau, r.label_ratio
        )
        for v in range(2)
    ]
    rho_t = [rho(per_view[v][0][i]) for v in range(2) for i in range(b)]
    p_in = 0.5 * (per_view[0][1] + per_view[1][1])
    total = 0.0
    for v in range(views):
        for i in range(b):
            p = predict(anchors[v * b + i], a_sup, a_lab)
            if v == 0:
                target = rho_t[b + i]
            elif v == 1:
                target = rho_t[i]
            else:
                target = 0.5 * (rho_t[i] + rho_t[b + i])
            total = total - p_in[i] ** r.prior_pow * (target * torch.log(p)).sum()
    return total / (views * b)


@pytest.mark.parametrize("small_views", [0, 3])
@pytest.mark.parametrize("prior_pow", [1.0, 2.0])
def test_ropaws_loss_matches_loop_reference_values_and_gradients(small_views, prior_pow):
    torch.manual_seed(small_views + int(prior_pow))
    B, D, K, k = 4, 5, 3, 2
    r = RoPAWS(prior_tau=0.5, prior_pow=prior_pow, label_ratio=5.0)
    anchors = torch.randn((2 + small_views) * B, D, dtype=torch.float64, requires_grad=True)
    supports = torch.randn(K * k, D, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(2 * B, D, dtype=torch.float64)
    t_sup = torch.randn(K * k, D, dtype=torch.float64)
    labels = smooth_labels(torch.arange(K).repeat_interleave(k), K, 0.1).double()
    ce, reg = paws_loss(
        anchors, supports, labels, targets, t_sup, labels, 0.1, 0.25, me_max=False, ropaws=r
    )
    assert reg.item() == 0.0
    g = torch.autograd.grad(ce, [anchors, supports])
    a2, s2 = anchors.detach().clone().requires_grad_(), supports.detach().clone().requires_grad_()
    ref = reference_ropaws_loss(a2, s2, labels, targets, t_sup, labels, 0.1, 0.25, r)
    g_ref = torch.autograd.grad(ref, [a2, s2])
    assert ce.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(g, g_ref):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    # Targets carry no gradient: only the anchors' and supports' paths do.
    assert not targets.requires_grad


def test_ropaws_predictions_match_the_loop_reference_and_are_distributions():
    torch.manual_seed(3)
    views, supports = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    labels = torch.eye(2, dtype=torch.float64).repeat_interleave(2, dim=0)
    probs, p_in = ropaws_predictions(views, supports, labels, 0.1, 0.3, 5.0)
    ref_probs, ref_in = reference_ropaws_targets(views, supports, labels, 0.1, 0.3, 5.0)
    assert torch.allclose(probs, ref_probs, atol=1e-9) and torch.allclose(p_in, ref_in, atol=1e-9)
    assert torch.allclose(probs.sum(dim=1), torch.ones(6, dtype=torch.float64))
    assert ((p_in > 0) & (p_in <= 1)).all()


def test_ropaws_gives_an_image_far_from_every_support_little_mass_and_a_flat_target():
    supports = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.eye(2)
    near = torch.tensor([[0.99, 0.1, 0.0]])  # next to the class-0 support
    far = torch.tensor([[0.0, 0.0, 1.0]])  # orthogonal to both supports
    probs, p_in = ropaws_predictions(torch.cat([near, far]), supports, labels, 0.1, 0.1, 5.0)
    assert p_in[0] > 0.9 and probs[0, 0] > 0.95
    assert p_in[1] < 1e-3  # exp((0 - 1) / 0.1) = 4.5e-5 at most
    assert torch.allclose(probs[1], torch.tensor([0.5, 0.5]), atol=1e-3)


def test_ropaws_of_the_whole_batch_equals_the_local_batch_in_one_process():
    torch.manual_seed(4)
    B, D, K = 4, 6, 3
    anchors = torch.randn(2 * B, D)
    supports, t_sup = torch.randn(K * 2, D), torch.randn(K * 2, D)
    labels = smooth_labels(torch.arange(K).repeat_interleave(2), K, 0.1)
    targets = torch.randn(2 * B, D)
    r = RoPAWS()
    alone = paws_loss(anchors, supports, labels, targets, t_sup, labels, ropaws=r)
    # The same images as rows 2..5 of a batch of 8 gathered from two processes: the targets
    # now also see the other process's images, so the loss changes, but giving this process's
    # rows of the whole batch is what a two-process run computes.
    other = torch.randn(2, B, D)
    whole = torch.cat([targets.view(2, B, D), other], dim=1)
    rows = torch.arange(B)
    same = paws_loss(
        anchors,
        supports,
        labels,
        targets,
        t_sup,
        labels,
        ropaws=r,
        batch=(targets.view(2, B, D), rows),
    )
    assert torch.allclose(alone[0], same[0])
    mixed = paws_loss(
        anchors, supports, labels, targets, t_sup, labels, ropaws=r, batch=(whole, rows)
    )
    assert not torch.allclose(alone[0], mixed[0])


def test_nt_xent_over_two_processes_keys_is_the_whole_batch_loss():
    from paws.method.losses import nt_xent

    g = torch.Generator().manual_seed(0)
    f, s = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    whole = nt_xent(f, s, 0.3)
    # Each process holds 3 images; its rows look for their pairs among both processes' rows.
    keys = torch.cat([F.normalize(torch.cat([f[i : i + 3], s[i : i + 3]]), dim=1) for i in (0, 3)])
    ranks = [nt_xent(f[i : i + 3], s[i : i + 3], 0.3, keys, 2 * i) for i in (0, 3)]
    assert torch.allclose((ranks[0] + ranks[1]) / 2, whole, atol=1e-6)
    # Alone, a process's own rows as keys are the default.
    own = F.normalize(torch.cat([f[:3], s[:3]]), dim=1)
    assert torch.allclose(nt_xent(f[:3], s[:3], 0.3, own, 0), nt_xent(f[:3], s[:3], 0.3))
