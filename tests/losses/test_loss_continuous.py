"""Continuous-action losses against closed forms and torch.distributions."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from embodied_distill import losses as L


def test_gaussian_kl_scalar_by_hand():
    # KL(N(1, 2^2) || N(0, 1^2)) = log(1/2) + (4 + 1) / 2 - 1/2 = 2 - log 2
    mu_p, ls_p = torch.tensor([1.0]), torch.tensor([math.log(2.0)])
    mu_q, ls_q = torch.tensor([0.0]), torch.tensor([0.0])
    assert L.gaussian_kl(mu_p, ls_p, mu_q, ls_q).item() == pytest.approx(2.0 - math.log(2.0), rel=1e-6)
    # and the other direction: KL(N(0,1) || N(1,4)) = log 2 + (1 + 1) / 8 - 1/2
    assert L.gaussian_kl(mu_q, ls_q, mu_p, ls_p).item() == pytest.approx(math.log(2.0) + 0.25 - 0.5, rel=1e-6)


def test_gaussian_kl_matches_torch_distributions_summed_over_action_dim():
    torch.manual_seed(0)
    mu_p, mu_q = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    ls_p, ls_q = (
        torch.randn(2, 4, 3, dtype=torch.float64) * 0.5,
        torch.randn(2, 4, 3, dtype=torch.float64) * 0.5,
    )
    ref = kl_divergence(Normal(mu_p, ls_p.exp()), Normal(mu_q, ls_q.exp())).sum(-1)
    torch.testing.assert_close(L.gaussian_kl(mu_p, ls_p, mu_q, ls_q, reduction="none"), ref)
    mask = torch.tensor([[True, False, True, True], [False, False, False, True]])
    torch.testing.assert_close(L.gaussian_kl(mu_p, ls_p, mu_q, ls_q, mask), ref[mask].mean())


def test_gaussian_kl_identical_is_zero_and_global_log_std_broadcasts():
    mu = torch.randn(5, 3)
    ls = torch.full((3,), math.log(0.1))  # COMPASS: global learnable sigma, init 0.1
    assert L.gaussian_kl(mu, ls, mu.clone(), ls.clone()).abs().item() < 1e-6
    mu_t = torch.randn(5, 3)
    ls_t = torch.randn(5, 3) * 0.3
    ref = kl_divergence(Normal(mu_t, ls_t.exp()), Normal(mu, ls.exp().expand(5, 3))).sum(-1).mean()
    torch.testing.assert_close(L.gaussian_kl(mu_t, ls_t, mu, ls), ref)


def test_gaussian_nll_matches_normal_log_prob():
    torch.manual_seed(1)
    a, mu, ls = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4) * 0.3
    ref = -Normal(mu, ls.exp()).log_prob(a).sum(-1)
    torch.testing.assert_close(L.gaussian_nll(a, mu, ls, reduction="none"), ref)


def test_masked_mse_and_l1():
    torch.manual_seed(2)
    pred, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(L.masked_mse(pred, target), F.mse_loss(pred, target))
    torch.testing.assert_close(L.masked_l1(pred, target), F.l1_loss(pred, target))
    step_mask = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    # A step mask counts every action dimension of a kept step: 3 steps x 3 dims = 9 elements.
    sq = (pred - target) ** 2
    expected = (sq[0, :2].sum() + sq[1, :1].sum()) / 9
    torch.testing.assert_close(L.masked_mse(pred, target, step_mask), expected)
    elem_mask = torch.zeros(2, 5, 3, dtype=torch.bool)
    elem_mask[0, 0, 1] = elem_mask[1, 4, 2] = True
    torch.testing.assert_close(
        L.masked_l1(pred, target, elem_mask), ((pred - target).abs()[elem_mask]).mean()
    )
    with pytest.raises(ValueError):
        L.masked_mse(pred, target[:, :4])
