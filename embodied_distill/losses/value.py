"""Value-learning losses for offline RL critics (IQL, as used by RL-100's advantage estimates).

IQL (Kostrikov et al., 2021, https://arxiv.org/abs/2110.06169) fits ``V(s)`` as an upper expectile of
``Q(s, a)`` over dataset actions, and ``Q(s, a)`` to ``r + gamma V(s')``; ``A = Q - V`` is the advantage.
"""

from __future__ import annotations

from torch import Tensor

from .reduce import Reduction, check_reduction, masked_reduce


def expectile_loss(
    diff: Tensor,
    mask: Tensor | None = None,
    *,
    expectile: float = 0.7,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Asymmetric squared loss ``|tau - 1(u < 0)| u^2`` on ``u = diff = target - prediction``.

    With ``diff = Q(s, a).detach() - V(s)`` minimising it makes V the ``tau``-expectile of Q over the
    data's actions (``tau = 0.5``: the mean, half the squared error; ``tau -> 1``: the maximum). Shape
    ``(...)``, mask ``(...)``; nothing is detached here (detach the target at the call site).
    """
    check_reduction(reduction)
    if not 0.0 < expectile < 1.0:
        raise ValueError(f"expectile must lie in (0, 1), got {expectile}")
    weight = (diff < 0).to(diff.dtype).mul(1.0 - 2.0 * expectile).add(expectile)  # tau or 1 - tau
    return masked_reduce(weight * diff.square(), mask, reduction, num_items)
