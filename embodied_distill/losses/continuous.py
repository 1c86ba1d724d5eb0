"""Losses on continuous actions: diagonal Gaussian KL, masked MSE / L1, Gaussian NLL.

Shapes: action tensors ``(..., Da)`` -- typically action chunks ``(B, Ta, Da)`` -- and masks over the
leading dimensions: ``(B, Ta)`` (per step; broadcast over Da) or ``(B, Ta, Da)`` (per element) for
MSE / L1; the Gaussian losses are summed over Da first, so their mask is ``(B, Ta)`` (or ``(B,)``).

Directions: :func:`gaussian_kl` ``(p, q)`` is KL(p || q). COMPASS distils with KL(teacher || student)
(``gaussian_kl(mu_T, log_std_T, mu_S, log_std_S)``); RPD's multi-sample option uses
KL(student || teacher). Nothing is detached here: detach the teacher's statistics at the call site.
"""

from __future__ import annotations

import math

from torch import Tensor

from .reduce import Reduction, check_reduction, masked_reduce

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_kl(
    mu_p: Tensor,
    log_std_p: Tensor,
    mu_q: Tensor,
    log_std_q: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """KL(p || q) between diagonal Gaussians, summed over the last (action) dimension.

    ``KL = sum_d [log s_q - log s_p + (s_p^2 + (mu_p - mu_q)^2) / (2 s_q^2) - 1/2]``, computed from the
    log standard deviations (no division by a small std). Shapes: means ``(..., Da)``; log-stds
    ``(..., Da)`` or broadcastable (e.g. a global ``(Da,)`` learnable log-std); mask ``(...)``.
    Returns a scalar, or ``(...)`` for ``reduction="none"``. Swap the arguments for the other
    direction.
    """
    check_reduction(reduction)
    log_ratio = log_std_p - log_std_q
    z = (mu_p - mu_q) * (-log_std_q).exp()
    per_dim = -log_ratio + 0.5 * ((2.0 * log_ratio).exp() + z.square()) - 0.5
    return masked_reduce(per_dim.sum(-1), mask, reduction, num_items)


def gaussian_nll(
    actions: Tensor,
    mu: Tensor,
    log_std: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Negative log-likelihood ``-log N(actions; mu, exp(log_std)^2)`` summed over the last dimension.

    RPD's likelihood option: the teacher's action scored under the student's Gaussian policy
    (``gaussian_nll(teacher_action.detach(), student_mu, student_log_std)``). Shapes: ``(..., Da)``
    (log-std broadcastable), mask ``(...)``.
    """
    check_reduction(reduction)
    z = (actions - mu) * (-log_std).exp()
    per_dim = 0.5 * z.square() + log_std + _HALF_LOG_2PI
    return masked_reduce(per_dim.sum(-1), mask, reduction, num_items)


def masked_mse(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Squared error ``(pred - target)^2`` element-wise, averaged over the unmasked elements.

    Shapes: ``pred``, ``target`` ``(B, Ta, Da)`` (any shape, equal); mask ``(B, Ta)`` (a step mask,
    counted once per action dimension) or ``(B, Ta, Da)``. Without a mask equals
    ``F.mse_loss(pred, target)``. The target is not detached.
    """
    check_reduction(reduction)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    return masked_reduce((pred - target).square(), mask, reduction, num_items)


def masked_l1(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Absolute error ``|pred - target|`` element-wise, averaged over the unmasked elements.

    Shapes and masking as in :func:`masked_mse`.
    """
    check_reduction(reduction)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    return masked_reduce((pred - target).abs(), mask, reduction, num_items)
