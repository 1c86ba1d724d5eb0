"""IQL's expectile loss against its closed form."""

import pytest
import torch

from embodied_distill.losses import expectile_loss, masked_mse


def test_expectile_loss_closed_form_and_masks():
    diff = torch.tensor([2.0, -1.0, 0.5, -3.0])
    # tau * u^2 for u >= 0, (1 - tau) * u^2 for u < 0
    expected = torch.tensor([0.8 * 4, 0.2 * 1, 0.8 * 0.25, 0.2 * 9])
    torch.testing.assert_close(expectile_loss(diff, expectile=0.8, reduction="none"), expected)
    assert float(expectile_loss(diff, expectile=0.8)) == pytest.approx(float(expected.mean()))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert float(expectile_loss(diff, mask, expectile=0.8)) == pytest.approx((3.2 + 0.2) / 2)
    # tau = 0.5 is half the squared error
    half_mse = 0.5 * float(masked_mse(diff, torch.zeros(4)))
    assert float(expectile_loss(diff, expectile=0.5)) == pytest.approx(half_mse)
    with pytest.raises(ValueError, match="expectile"):
        expectile_loss(diff, expectile=1.0)


def test_expectile_fit_recovers_the_upper_expectile():
    samples = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        expectile_loss(samples - v, expectile=0.9).backward()
        opt.step()
    # the 0.9-expectile m of N(0, 1) solves 0.9 E[(x-m)+] = 0.1 E[(m-x)+]
    m = float(v)
    pos = torch.clamp(samples - m, min=0).mean()
    neg = torch.clamp(m - samples, min=0).mean()
    assert float(0.9 * pos - 0.1 * neg) == pytest.approx(0.0, abs=2e-3)
    assert 0.8 < m < 1.0
