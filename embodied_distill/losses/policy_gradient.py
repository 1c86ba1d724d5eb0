"""PPO pieces shared by RPD, COMPASS's residual RL, RL-100 and the OPD trainers.

Rollout tensors are *time-major*: ``(T, N)`` = (steps, parallel environments), as collected by a
vectorised environment. The per-sample losses accept any shape, e.g. a flattened minibatch ``(M,)``
or per-token ``(B, L)``, with a mask of the same shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reduce import Reduction, check_reduction, expand_mask, masked_reduce


def ppo_clip_loss(
    log_prob_new: Tensor,
    log_prob_old: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip: float = 0.2,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """PPO clipped surrogate, as a loss to minimise.

    Per sample ``-min(r A, clip(r, 1 - clip, 1 + clip) A)`` with ``r = exp(log_prob_new - log_prob_old)``.
    ``log_prob_old`` and ``advantages`` are treated as constants (detached). All inputs share one shape
    ``(...)``; mask ``(...)``. Returns a scalar, or ``(...)`` for ``reduction="none"``.
    """
    check_reduction(reduction)
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if not (log_prob_new.shape == log_prob_old.shape == advantages.shape):
        raise ValueError("log_prob_new, log_prob_old and advantages must have the same shape")
    adv = advantages.detach()
    ratio = torch.exp(log_prob_new - log_prob_old.detach())
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    return masked_reduce(-torch.minimum(unclipped, clipped), mask, reduction, num_items)


def ppo_stats(
    log_prob_new: Tensor, log_prob_old: Tensor, mask: Tensor | None = None, *, clip: float = 0.2
) -> dict[str, Tensor]:
    """Diagnostics for a PPO update (detached scalars): ``approx_kl`` (the k3 estimate of
    KL(old || new)), ``clip_fraction`` (share of samples with ``|r - 1| > clip``) and ``ratio_mean``."""
    log_ratio = (log_prob_new - log_prob_old).detach()
    ratio = log_ratio.exp()
    return {
        "approx_kl": masked_reduce(torch.expm1(log_ratio) - log_ratio, mask),
        "clip_fraction": masked_reduce(((ratio - 1.0).abs() > clip).to(ratio.dtype), mask),
        "ratio_mean": masked_reduce(ratio, mask),
    }


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    *,
    clip: float | None = 0.2,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """PPO value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, ``V_clip = V_old + clip(V - V_old, +-clip)``.

    ``clip=None`` gives the plain ``0.5 * (V - R)^2``. ``old_values`` and ``returns`` are detached.
    All inputs ``(...)``, mask ``(...)``.
    """
    check_reduction(reduction)
    if not (values.shape == old_values.shape == returns.shape):
        raise ValueError("values, old_values and returns must have the same shape")
    target = returns.detach()
    loss = (values - target).square()
    if clip is not None:
        old = old_values.detach()
        clipped = old + (values - old).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - target).square())
    return masked_reduce(0.5 * loss, mask, reduction, num_items)


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor | None = None,
    *,
    coef: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """The entropy term as a loss to *add*: ``-coef * entropy``, reduced over unmasked samples.

    ``entropy`` is the policy entropy per sample ``(...)`` (e.g. ``dist.entropy().sum(-1)`` for a
    diagonal Gaussian, or :func:`~embodied_distill.losses.weighting.token_entropy` for tokens).
    """
    check_reduction(reduction)
    return masked_reduce(-coef * entropy, mask, reduction, num_items)


def normalize_advantages(advantages: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """``(A - mean) / (std + eps)`` over the unmasked entries; masked entries become exactly 0.

    Uses the unbiased standard deviation (as cleanrl / SB3 do; 0 for a single entry). Returns a new
    tensor of the input shape; the input is not modified.
    """
    if mask is None:
        valid = torch.ones_like(advantages, dtype=torch.bool)
    else:
        valid = expand_mask(mask, advantages.shape) != 0
    count = valid.sum()
    zero = advantages.new_zeros(())
    kept = torch.where(valid, advantages, zero)
    mean = kept.sum() / count.clamp_min(1)
    centred = torch.where(valid, advantages - mean, zero)
    var = centred.square().sum() / (count - 1).clamp_min(1)
    return centred / (var.sqrt() + eps)


@torch.no_grad()
def compute_gae(
    rewards: Tensor,
    values: Tensor,
    dones: Tensor,
    last_value: Tensor,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a time-major rollout.

    Args:
        rewards: ``(T, N)`` reward received after the action at step t.
        values: ``(T, N)`` V(s_t) of the state the action at step t was taken in.
        dones: ``(T, N)`` 1 where the episode *terminated* with the transition at step t (then
            V(s_{t+1}) is not bootstrapped, and the advantage does not flow back across the boundary;
            with auto-resetting vector envs the next row already belongs to a new episode). For a
            time-limit truncation pass 0 and add ``gamma * V(final_obs)`` to that step's reward.
        last_value: ``(N,)`` V(s_T) of the observation after the last step (bootstrap).
        gamma, lam: discount and GAE lambda.

    Returns ``(advantages, returns)``, each ``(T, N)``, with ``returns = advantages + values``:
    ``delta_t = r_t + gamma (1 - d_t) V_{t+1} - V_t``, ``A_t = delta_t + gamma lam (1 - d_t) A_{t+1}``.
    Computed without gradient; the inputs are not modified. Trailing dims beyond N are allowed.
    """
    if not (rewards.shape == values.shape == dones.shape):
        raise ValueError("rewards, values and dones must have the same (T, N) shape")
    if last_value.shape != values.shape[1:]:
        raise ValueError(
            f"last_value must have shape {tuple(values.shape[1:])}, got {tuple(last_value.shape)}"
        )
    not_done = 1.0 - dones.to(values.dtype)
    advantages = torch.empty_like(values)
    next_value, next_adv = last_value.to(values.dtype), torch.zeros_like(last_value, dtype=values.dtype)
    for t in range(values.shape[0] - 1, -1, -1):
        delta = rewards[t] + gamma * not_done[t] * next_value - values[t]
        next_adv = delta + gamma * lam * not_done[t] * next_adv
        advantages[t] = next_adv
        next_value = values[t]
    return advantages, advantages + values
