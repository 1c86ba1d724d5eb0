"""TAID, ExOPD, TIP, SCOPE weights and logit standardisation."""

import math

import numpy as np
import pytest
import torch

from embodied_distill import losses as L


def _pair(seed=0, shape=(3, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_(), torch.randn(
        shape, generator=g, dtype=torch.float64
    ) * 2


# ----------------------------------------------------------------------------------------- TAID


def test_taid_target_endpoints_and_closed_form():
    s, t = _pair()
    torch.testing.assert_close(L.taid_target_log_probs(s, t, 0.0), torch.log_softmax(s.detach(), -1))
    torch.testing.assert_close(L.taid_target_log_probs(s, t, 1.0), torch.log_softmax(t, -1))
    # By hand for one row: softmax((1 - t) z_S + t z_T) with numpy.
    zs, zt = s.detach()[0, 0].numpy(), t[0, 0].numpy()
    mix = 0.35 * zs + 0.65 * zt
    expected = mix - np.log(np.exp(mix).sum())
    np.testing.assert_allclose(L.taid_target_log_probs(s, t, 0.65)[0, 0].numpy(), expected, rtol=1e-12)


def test_taid_loss_is_forward_kl_to_detached_target():
    s, t = _pair(1)
    torch.testing.assert_close(L.taid_loss(s, t, t=1.0), L.forward_kl(s, t))
    loss = L.taid_loss(s, t, t=0.5, reduction="sum")
    (g,) = torch.autograd.grad(loss, s)
    # Target detached: the gradient is p_S - p_target (forward-KL gradient with a constant target).
    target = L.taid_target_log_probs(s, t, 0.5).exp()
    torch.testing.assert_close(g, torch.softmax(s.detach(), -1) - target)
    assert L.taid_loss(s, t, t=0.0).abs().item() < 1e-12


def test_taid_linear_schedule():
    assert L.taid_linear_t(0, 100) == pytest.approx(0.4)
    assert L.taid_linear_t(50, 100) == pytest.approx(0.7)
    assert L.taid_linear_t(100, 100) == pytest.approx(1.0)
    assert L.taid_linear_t(500, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        L.taid_linear_t(0, 0)


def test_taid_adaptive_update_by_hand():
    # Many total steps, so the linear floor moves slower than the adaptive step and the latter shows.
    n = 10**6
    state = L.TaidState(t=0.4)
    s1 = L.taid_update(state, loss=2.0, step=1, total_steps=n)
    # No previous loss: delta 0, m 0, step alpha * sigmoid(0) * (1 - 0.4) = 5e-4 * 0.5 * 0.6.
    assert s1.t == pytest.approx(0.4 + 5e-4 * 0.5 * 0.6, abs=1e-12)
    assert s1.momentum == 0.0 and s1.prev_loss == 2.0
    s2 = L.taid_update(s1, loss=1.0, step=2, total_steps=n)
    delta = (2.0 - 1.0) / (2.0 + 1e-8)
    m = 0.01 * delta
    assert s2.momentum == pytest.approx(m, abs=1e-15)
    assert s2.t == pytest.approx(s1.t + 5e-4 * (1 / (1 + math.exp(-m))) * (1 - s1.t), abs=1e-12)
    # With few total steps the linear floor wins.
    assert L.taid_update(state, 2.0, step=1, total_steps=1000).t == pytest.approx(0.4006, abs=1e-12)
    assert state.t == 0.4 and state.prev_loss is None  # pure


def test_taid_adaptive_stays_between_linear_and_end():
    state, ts = L.TaidState(), []
    rng = np.random.default_rng(0)
    loss = 5.0
    for step in range(1, 201):
        loss = loss * 0.97 + rng.normal() * 0.01
        state = L.taid_update(state, loss, step, 200, alpha=0.05)
        ts.append(state.t)
        assert L.taid_linear_t(step, 200) - 1e-12 <= state.t <= 1.0
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert ts[-1] == pytest.approx(1.0)
    # An improving loss moves t faster than the linear schedule.
    assert ts[20] > L.taid_linear_t(21, 200) + 1e-3
    fixed = L.taid_update(L.TaidState(), 1.0, 10, 100, adaptive=False)
    assert fixed.t == pytest.approx(L.taid_linear_t(10, 100))


# ---------------------------------------------------------------------------------------- ExOPD


def test_exopd_advantage_by_hand():
    ls = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    lt = torch.tensor([-0.5, -3.0, -0.5])
    lr = torch.tensor([-1.5, -2.5, -1.0])
    mask = torch.tensor([True, True, False])
    adv = L.exopd_advantage(ls, lt, lr, mask, reward_scale=1.5)
    expected = torch.tensor([1.5 * 1.0 - 0.5, 1.5 * (-0.5) - 0.5, 0.0])
    torch.testing.assert_close(adv, expected)
    assert not adv.requires_grad
    # lambda = 1 is standard OPD whatever the reference.
    torch.testing.assert_close(L.exopd_advantage(ls, lt, lr, reward_scale=1.0), L.opd_advantage(ls, lt))


# ------------------------------------------------------------------------------------------ TIP


def test_token_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(0.9), math.log(0.1)]])
    expected = torch.tensor([math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))])
    torch.testing.assert_close(L.token_entropy(logits), expected)


def test_tip_quadrants_by_hand():
    ent = torch.tensor([0.1, 0.9, 0.2, 0.8, 5.0])
    div = torch.tensor([0.1, 0.2, 0.9, 0.8, 5.0])
    mask = torch.tensor([True, True, True, True, False])
    q = L.tip_quadrants(ent, div, mask, entropy_threshold=0.5, divergence_threshold=0.5)
    assert q.tolist() == [
        L.LOW_ENTROPY_LOW_DIVERGENCE,
        L.HIGH_ENTROPY_LOW_DIVERGENCE,
        L.LOW_ENTROPY_HIGH_DIVERGENCE,
        L.HIGH_ENTROPY_HIGH_DIVERGENCE,
        -1,
    ]
    # Default thresholds are the medians over unmasked tokens (lower median 0.2 / 0.2 here).
    assert L.tip_quadrants(ent, div, mask).tolist() == [0, 1, 2, 3, -1]


def test_tip_select_rules():
    ent = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.3, 0.7, 0.05, 2.0]])
    div = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.05, 0.3, 0.8, 0.4]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    by_ent = L.tip_select(ent, div, mask, keep_fraction=0.5, rule="entropy")
    # 7 valid tokens -> ceil(3.5) = 4 highest entropies among valid: 0.9, 0.8, 0.7, 0.3.
    assert by_ent.tolist() == [[False, True, False, True], [True, True, False, False]]
    by_div = L.tip_select(ent, div, mask, keep_fraction=2 / 7, rule="divergence")
    assert by_div.tolist() == [[True, False, False, False], [False, False, True, False]]
    over = L.tip_select(ent, div, mask, keep_fraction=2 / 7, rule="overconfident")
    # Low entropy (<= median 0.3): tokens with entropy 0.1, 0.2, 0.3, 0.05; top-2 divergence: 0.9, 0.8.
    assert over.tolist() == [[True, False, False, False], [False, False, True, False]]
    combined = L.tip_select(ent, div, mask, keep_fraction=4 / 7, rule="combined")
    assert int(combined.sum()) == 4 and not (combined & ~mask).any()
    assert combined[0, 1] and combined[0, 3]  # the two highest entropies
    assert combined[0, 0] and combined[1, 2]  # the two most overconfident
    assert not L.tip_select(ent, div, mask, keep_fraction=0.0).any()
    assert torch.equal(L.tip_select(ent, div, mask, keep_fraction=1.0), mask)
    with pytest.raises(ValueError):
        L.tip_select(ent, div, mask, rule="random")


# ---------------------------------------------------------------------------------------- SCOPE


def test_sequence_log_perplexity_and_weights_by_hand():
    lp = torch.tensor([[-1.0, -3.0, -9.0], [-0.5, -0.5, -0.5], [-2.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    log_ppl = L.sequence_log_perplexity(lp, mask)
    torch.testing.assert_close(log_ppl, torch.tensor([2.0, 0.5, 2.0, 0.0]))
    w = L.perplexity_weights(lp, mask, group_size=2)
    ppl = np.exp([2.0, 0.5, 2.0, 0.0])
    expected = np.concatenate([2 * ppl[:2] / ppl[:2].sum(), 2 * ppl[2:] / ppl[2:].sum()])
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    w_inv = L.perplexity_weights(lp, mask, invert=True)
    inv = 1 / ppl
    np.testing.assert_allclose(w_inv.numpy(), 4 * inv / inv.sum(), rtol=1e-6)
    assert w_inv[1] > w_inv[0]  # low perplexity weighted up
    with pytest.raises(ValueError):
        L.perplexity_weights(lp, mask, group_size=3)


# ------------------------------------------------------------------------------ standardisation


def test_standardize_logits():
    torch.manual_seed(0)
    z = torch.randn(4, 10, dtype=torch.float64) * 3 + 5
    out = L.standardize_logits(z)
    torch.testing.assert_close(out.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.std(-1), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    # Invariant to a per-row shift and positive scale, which is the point of standardising.
    torch.testing.assert_close(L.standardize_logits(2.0 * z - 7.0), out, atol=1e-6, rtol=0)
    assert torch.isfinite(L.standardize_logits(torch.zeros(2, 5))).all()
