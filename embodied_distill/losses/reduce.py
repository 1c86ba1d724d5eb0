"""The one reduction every loss in this package ends with.

Every loss computes a per-item tensor (one value per token, per time step, per action element, ...)
and hands it to :func:`masked_reduce`, so masking, the all-masked case and gradient-accumulation
normalisation behave the same everywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of ``"mean"``, ``"sum"``, ``"none"``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def expand_mask(mask: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Right-pad ``mask`` with singleton dimensions and expand it to ``shape`` (a view, no copy).

    A mask covers the *leading* dimensions of the values: a ``(B, Ta)`` step mask applies to every
    action dimension of ``(B, Ta, Da)`` values. ``mask.shape`` must equal ``shape[:mask.dim()]``.
    """
    shape = tuple(shape)
    if tuple(mask.shape) == shape:
        return mask
    if mask.dim() > len(shape) or tuple(mask.shape) != shape[: mask.dim()]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not cover the leading dimensions of values of "
            f"shape {shape}"
        )
    return mask.reshape(tuple(mask.shape) + (1,) * (len(shape) - mask.dim())).expand(shape)


def masked_reduce(
    values: Tensor,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-item ``values`` over the positions that ``mask`` keeps.

    Args:
        values: per-item values, any shape ``(...)``.
        mask: ``None`` (keep everything), or a bool / float tensor whose shape equals ``values.shape``
            or its leading dimensions (it is then broadcast over the trailing ones, see
            :func:`expand_mask`). A float mask acts as per-item weights; a bool mask as weights 0/1.
        reduction: ``"mean"``: weighted sum divided by the sum of the mask (the number of unmasked
            items); ``"sum"``: weighted sum; ``"none"``: the values with masked items set to exactly 0
            (weighted by a float mask), shape ``values.shape``.
        num_items: for ``"mean"`` only: divide by this instead of the local mask sum. Under gradient
            accumulation pass the number of unmasked items over *all* micro-batches of the step, so
            the accumulated gradient equals the one of a single large batch.

    Returns:
        A scalar tensor for ``"mean"`` / ``"sum"``, else a tensor shaped like ``values``.

    Masked items never contribute, even when they hold inf / NaN (they are selected away with
    ``torch.where``, not multiplied by 0). When every item is masked the result is exactly 0 and
    the gradient with respect to ``values`` is exactly 0 (never NaN). The input is never modified.
    """
    check_reduction(reduction)
    if num_items is not None and reduction != "mean":
        raise ValueError("num_items only applies to reduction='mean'")
    if mask is None:
        if reduction == "none":
            return values
        total = values.sum()
        if reduction == "sum":
            return total
        denom = values.new_tensor(float(values.numel())) if num_items is None else num_items
        return total / _positive_or_one(denom, total)

    mask = expand_mask(mask, values.shape)
    keep = mask if mask.dtype == torch.bool else mask != 0
    if mask.dtype == torch.bool:
        weighted = torch.where(keep, values, values.new_zeros(()))
    else:
        weighted = torch.where(keep, values * mask.to(values.dtype), values.new_zeros(()))
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    if num_items is None:
        denom = mask.sum(dtype=values.dtype) if mask.dtype == torch.bool else mask.to(values.dtype).sum()
    else:
        denom = num_items
    return total / _positive_or_one(denom, total)


def _positive_or_one(denom: float | Tensor, like: Tensor) -> Tensor:
    """``denom`` as a tensor, with values <= 0 replaced by 1 (an all-masked sum is 0, so 0 / 1 = 0)."""
    denom = torch.as_tensor(denom, dtype=like.dtype, device=like.device)
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def reduction_weights(
    mask: Tensor | None,
    shape: torch.Size | tuple[int, ...],
    reduction: Reduction,
    num_items: float | Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-item weights ``w`` (shape ``shape``) with ``masked_reduce(v, mask, reduction, num_items)`` equal
    to ``where(w != 0, v * w, 0).sum()`` for ``"mean"`` / ``"sum"``.

    Used by fused losses that fold the reduction into their own backward pass.
    """
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError("reduction_weights needs reduction='mean' or 'sum'")
    if num_items is not None and reduction != "mean":
        raise ValueError("num_items only applies to reduction='mean'")
    if mask is None:
        weights = torch.ones(shape, dtype=dtype, device=device)
    else:
        weights = expand_mask(mask, shape).to(dtype=dtype, device=device)
    if reduction == "sum":
        return weights
    denom = weights.sum() if num_items is None else num_items
    return weights / _positive_or_one(denom, weights)
