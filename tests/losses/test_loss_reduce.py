import math

import pytest
import torch

from embodied_distill.losses import expand_mask, masked_reduce, reduction_weights


def test_mean_sum_none_against_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_reduce(values, mask, "sum").item() == 1.0 + 3.0 + 6.0
    assert masked_reduce(values, mask, "mean").item() == pytest.approx((1.0 + 3.0 + 6.0) / 3)
    none = masked_reduce(values, mask, "none")
    assert torch.equal(none, torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 6.0]]))
    assert masked_reduce(values, None, "mean").item() == pytest.approx(3.5)
    assert masked_reduce(values, None, "sum").item() == 21.0
    assert masked_reduce(values, None, "none") is values


def test_float_mask_acts_as_weights():
    values = torch.tensor([1.0, 2.0, 4.0])
    weights = torch.tensor([0.5, 0.0, 2.0])
    assert masked_reduce(values, weights, "sum").item() == pytest.approx(0.5 + 8.0)
    assert masked_reduce(values, weights, "mean").item() == pytest.approx(8.5 / 2.5)


def test_prefix_mask_broadcasts_over_trailing_dims():
    values = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    # kept elements: [0, 1] and [10, 11]
    assert masked_reduce(values, mask, "mean").item() == pytest.approx((0 + 1 + 10 + 11) / 4)
    assert expand_mask(mask, values.shape).shape == values.shape
    with pytest.raises(ValueError):
        masked_reduce(values, torch.ones(3, 2, dtype=torch.bool))


def test_masked_inf_and_nan_do_not_leak():
    values = torch.tensor([1.0, math.inf, math.nan, 3.0])
    mask = torch.tensor([True, False, False, True])
    assert masked_reduce(values, mask, "mean").item() == 2.0
    assert torch.isfinite(masked_reduce(values, mask, "none")).all()


def test_all_masked_is_zero_with_zero_gradient():
    values = torch.randn(4, 5, requires_grad=True)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        out = masked_reduce(values, mask, reduction)
        (grad,) = torch.autograd.grad(out, values)
        assert out.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
    out = masked_reduce(values, torch.zeros(4, 5), "mean")
    assert out.item() == 0.0


def test_num_items_gives_global_normalisation_for_gradient_accumulation():
    torch.manual_seed(0)
    values = torch.randn(6, 4, requires_grad=True)
    mask = torch.rand(6, 4) > 0.4
    full = masked_reduce(values, mask, "mean")
    (g_full,) = torch.autograd.grad(full, values)
    total = int(mask.sum())
    acc = masked_reduce(values[:2], mask[:2], "mean", num_items=total) + masked_reduce(
        values[2:], mask[2:], "mean", num_items=total
    )
    (g_acc,) = torch.autograd.grad(acc, values)
    torch.testing.assert_close(acc, full)
    torch.testing.assert_close(g_acc, g_full)
    # The naive per-micro-batch mean differs whenever the micro-batches have different token counts.
    naive = 0.5 * (masked_reduce(values[:2], mask[:2]) + masked_reduce(values[2:], mask[2:]))
    if int(mask[:2].sum()) * 2 != total:
        assert not torch.allclose(naive, full)


def test_reduction_weights_reproduce_masked_reduce():
    torch.manual_seed(1)
    values = torch.randn(3, 4)
    mask = torch.rand(3, 4) > 0.5
    for reduction, num_items in (("mean", None), ("sum", None), ("mean", 17)):
        w = reduction_weights(mask, values.shape, reduction, num_items)
        torch.testing.assert_close((values * w).sum(), masked_reduce(values, mask, reduction, num_items))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        masked_reduce(torch.ones(2), None, "average")
    with pytest.raises(ValueError):
        masked_reduce(torch.ones(2), None, "sum", num_items=3)


def test_inputs_not_mutated():
    values = torch.randn(3, 4)
    mask = torch.rand(3, 4) > 0.5
    v0, m0 = values.clone(), mask.clone()
    for reduction in ("mean", "sum", "none"):
        masked_reduce(values, mask, reduction)
    assert torch.equal(values, v0) and torch.equal(mask, m0)
