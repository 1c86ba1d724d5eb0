"""Sampled-token reverse-KL estimators: unbiasedness, gradients in expectation, shapes."""

import numpy as np
import pytest
import torch

from embodied_distill import losses as L

V = 6
N_SAMPLES = 400_000
# Tolerance for Monte Carlo means: 5 standard errors (estimated from the samples). For a normal
# sampling distribution a correct estimator fails this with probability < 1e-6; the seed is fixed.
N_SE = 5.0


def _distributions(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    t = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    return s, t


def _exact_reverse_kl(s, t):
    p_s, p_t = (
        np.exp(s.numpy() - np.logaddexp.reduce(s.numpy())),
        np.exp(t.numpy() - np.logaddexp.reduce(t.numpy())),
    )
    return float(np.sum(p_s * np.log(p_s / p_t))), float(np.sum(p_t * np.log(p_t / p_s)))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_estimators_are_unbiased_for_reverse_kl(estimator):
    s, t = _distributions()
    rev, fwd = _exact_reverse_kl(s, t)
    g = torch.Generator().manual_seed(123)
    ids = torch.multinomial(torch.softmax(s, -1), N_SAMPLES, replacement=True, generator=g)
    log_s = torch.log_softmax(s, -1)[ids]
    log_t = torch.log_softmax(t, -1)[ids]
    fn = L.sampled_kl_k1 if estimator == "k1" else L.sampled_kl_k3
    per = fn(log_s, log_t, reduction="none")
    mean, se = per.mean().item(), per.std().item() / N_SAMPLES**0.5
    assert abs(mean - rev) < N_SE * se, (mean, rev, se)
    # The tolerance is tight enough to tell the two KL directions apart.
    assert abs(mean - fwd) > N_SE * se
    assert fn(log_s, log_t).item() == pytest.approx(mean, rel=1e-9)


def test_k3_is_nonnegative_and_lower_variance_near_teacher():
    s, _ = _distributions()
    t = s + 0.05 * torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ids = torch.multinomial(
        torch.softmax(s, -1), 50_000, replacement=True, generator=torch.Generator().manual_seed(1)
    )
    log_s, log_t = torch.log_softmax(s, -1)[ids], torch.log_softmax(t, -1)[ids]
    k1 = L.sampled_kl_k1(log_s, log_t, reduction="none")
    k3 = L.sampled_kl_k3(log_s, log_t, reduction="none")
    assert (k3 >= 0).all()
    assert k3.var() < 0.1 * k1.var()


def test_k1_k3_by_hand():
    log_s = torch.tensor([-0.5, -2.0])
    log_t = torch.tensor([-1.0, -1.0])
    torch.testing.assert_close(L.sampled_kl_k1(log_s, log_t, reduction="none"), torch.tensor([0.5, -1.0]))
    r = torch.exp(torch.tensor([-0.5, 1.0]))
    torch.testing.assert_close(L.sampled_kl_k3(log_s, log_t, reduction="none"), r - 1 - torch.log(r))


def _expected_grad(loss_of_token, s):
    """Exact E_{x ~ p_S}[grad loss(x)] by enumerating the vocabulary."""
    p = torch.softmax(s.detach(), -1)
    total = torch.zeros_like(s)
    for x in range(V):
        (g,) = torch.autograd.grad(loss_of_token(x), s)
        total += p[x] * g
    return total


def test_surrogate_gradient_is_unbiased_for_reverse_kl_gradient():
    s, t = _distributions(1)
    s.requires_grad_(True)
    log_t = torch.log_softmax(t, -1)

    def loss_of_token(x):
        log_s = torch.log_softmax(s, -1)
        return L.sampled_reverse_kl_surrogate(log_s[x : x + 1], log_t[x : x + 1])

    (exact,) = torch.autograd.grad(L.reverse_kl(s, t), s)
    torch.testing.assert_close(_expected_grad(loss_of_token, s), exact)


def test_k3_gradient_estimates_forward_kl_gradient_as_documented():
    s, t = _distributions(2)
    s.requires_grad_(True)
    log_t = torch.log_softmax(t, -1)

    def loss_of_token(x):
        return L.sampled_kl_k3(torch.log_softmax(s, -1)[x : x + 1], log_t[x : x + 1])

    (fwd,) = torch.autograd.grad(L.forward_kl(s, t), s)
    (rev,) = torch.autograd.grad(L.reverse_kl(s, t), s)
    expected = _expected_grad(loss_of_token, s)
    torch.testing.assert_close(expected, fwd)
    assert not torch.allclose(expected, rev, atol=1e-3)


def test_token_log_probs_and_sampled_kl_from_logits():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    ids = torch.randint(0, 5, (2, 3))
    lp = L.token_log_probs(s_logits, ids, temperature=2.0)
    ref = torch.log_softmax(s_logits / 2.0, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(lp, ref)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    for est, fn in (("k1", L.sampled_kl_k1), ("k3", L.sampled_kl_k3)):
        got = L.sampled_kl(s_logits, t_logits, ids, mask, estimator=est)
        want = fn(L.token_log_probs(s_logits, ids), L.token_log_probs(t_logits, ids), mask)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        L.sampled_kl(s_logits, t_logits, ids, estimator="k2")
    with pytest.raises(ValueError):
        L.token_log_probs(s_logits, ids[:, :2])


def test_opd_advantage_is_detached_negative_k1_and_masked():
    log_s = torch.tensor([[-0.5, -2.0, -1.0]], requires_grad=True)
    log_t = torch.tensor([[-1.0, -1.0, -0.2]])
    mask = torch.tensor([[True, True, False]])
    adv = L.opd_advantage(log_s, log_t, mask, scale=2.0)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 2.0, 0.0]]))
