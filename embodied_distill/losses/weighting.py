"""Targets, schedules and token / sequence weights that sit on top of the divergences.

* TAID (Shing et al., ICLR 2025, arXiv:2501.16937): forward KL to the interpolated target
  ``p_t = softmax((1 - t) stopgrad(z_S) + t z_T)``, with t rising from 0.4 to 1.0 (linear floor plus a
  momentum-adaptive step): :func:`taid_target_log_probs`, :func:`taid_loss`, :func:`taid_linear_t`,
  :func:`taid_update`.
* G-OPD / ExOPD (reward extrapolation): :func:`exopd_advantage`.
* TIP (token importance in OPD): :func:`token_entropy`, :func:`tip_quadrants`, :func:`tip_select`.
* SCOPE (perplexity-weighted OPD paths): :func:`sequence_log_perplexity`, :func:`perplexity_weights`.
* Logit standardisation (z-score over the vocabulary, Sun et al. CVPR 2024): :func:`standardize_logits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .divergences import check_pair, check_unit_interval, compute_dtype, kl_terms, log_softmax
from .reduce import Reduction, check_reduction, expand_mask, masked_reduce

# ---------------------------------------------------------------------------------------------------
# TAID
# ---------------------------------------------------------------------------------------------------


def taid_target_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, t: float, temperature: float = 1.0
) -> Tensor:
    """Log-probabilities of TAID's target ``softmax((1 - t) z_S + t z_T)``, ``(..., V)``, detached.

    ``z = logits / temperature``; ``t = 0`` is the (detached) student, ``t = 1`` the teacher.
    Interpolating logits or log-probabilities gives the same distribution (they differ by a per-row
    constant).
    """
    check_pair(student_logits, teacher_logits)
    check_unit_interval("t", t)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_s = log_softmax(student_logits.detach(), temperature, dtype)
    log_t = log_softmax(teacher_logits.detach(), temperature, dtype)
    return torch.log_softmax((1.0 - t) * log_s + t * log_t, dim=-1)


def taid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    t: float,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """TAID: forward KL(p_t || S) from the interpolated target p_t (detached) to the student.

    Shapes: logits ``(..., V)``, mask ``(...)``. ``t = 1`` is exactly :func:`forward_kl`.
    """
    check_reduction(reduction)
    target = taid_target_log_probs(student_logits, teacher_logits, t, temperature)
    log_s = log_softmax(student_logits, temperature, target.dtype)
    return masked_reduce(kl_terms(target, log_s).sum(-1), mask, reduction, num_items)


def taid_linear_t(step: int, total_steps: int, t_start: float = 0.4, t_end: float = 1.0) -> float:
    """Linear TAID schedule ``t_start + (t_end - t_start) * step / total_steps``, clipped to t_end."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    frac = min(max(step / total_steps, 0.0), 1.0)
    return t_start + (t_end - t_start) * frac


@dataclass(frozen=True)
class TaidState:
    """State of the adaptive TAID schedule: the current ``t``, the momentum of the relative loss
    change, and the previous loss (``None`` before the first update)."""

    t: float = 0.4
    momentum: float = 0.0
    prev_loss: float | None = None


def taid_update(
    state: TaidState,
    loss: float,
    step: int,
    total_steps: int,
    *,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    eps: float = 1e-8,
    adaptive: bool = True,
) -> TaidState:
    """One step of TAID's momentum-adaptive schedule (Algorithm 1 of the paper); returns the new state.

    With ``delta = (J_prev - J) / (J_prev + eps)`` (relative improvement of the loss J),
    ``m <- beta m + (1 - beta) delta`` and
    ``t <- min(t_end, max(t_linear(step), t + alpha * sigmoid(m) * (1 - t)))``.
    ``t`` never falls below the linear schedule and never exceeds ``t_end``; ``adaptive=False`` gives the
    linear schedule alone. Pure: the input state is not modified.
    """
    linear = taid_linear_t(step, total_steps, t_start, t_end)
    loss = float(loss)
    if not adaptive:
        return TaidState(t=min(t_end, linear), momentum=state.momentum, prev_loss=loss)
    delta = 0.0 if state.prev_loss is None else (state.prev_loss - loss) / (state.prev_loss + eps)
    momentum = beta * state.momentum + (1.0 - beta) * delta
    step_t = alpha * (1.0 / (1.0 + math.exp(-momentum))) * (1.0 - state.t)
    t = min(t_end, max(linear, state.t + step_t))
    return TaidState(t=t, momentum=momentum, prev_loss=loss)


# ---------------------------------------------------------------------------------------------------
# G-OPD / ExOPD
# ---------------------------------------------------------------------------------------------------


def exopd_advantage(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    reward_scale: float = 1.0,
) -> Tensor:
    """Per-token G-OPD advantage ``lambda (log pi_T - log pi_ref) - (log pi_S - log pi_ref)``.

    The G-OPD objective is ``lambda log(pi_T / pi_ref) - KL(pi_S || pi_ref)`` on the student's own
    tokens; ``reward_scale = lambda = 1`` is standard OPD (``log pi_T - log pi_S`` for any reference),
    ``lambda > 1`` is ExOPD's reward extrapolation. Inputs are per-token log-probabilities of the
    sampled tokens ``(...)``; returns a detached ``(...)`` tensor, exactly 0 at masked tokens.
    """
    if not (student_logprobs.shape == teacher_logprobs.shape == ref_logprobs.shape):
        raise ValueError("student, teacher and reference log-probs must have the same shape")
    ref = ref_logprobs.detach()
    adv = reward_scale * (teacher_logprobs.detach() - ref) - (student_logprobs.detach() - ref)
    return masked_reduce(adv, mask, "none")


# ---------------------------------------------------------------------------------------------------
# TIP
# ---------------------------------------------------------------------------------------------------

#: TIP quadrant codes returned by :func:`tip_quadrants` (bit 0: high entropy, bit 1: high divergence).
LOW_ENTROPY_LOW_DIVERGENCE = 0
HIGH_ENTROPY_LOW_DIVERGENCE = 1
LOW_ENTROPY_HIGH_DIVERGENCE = 2  # overconfident and wrong: dense corrective signal
HIGH_ENTROPY_HIGH_DIVERGENCE = 3


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` per position: ``(..., V) -> (...)``."""
    log_p = log_softmax(logits, temperature)
    return -(log_p.exp() * log_p).sum(-1)


def _valid(shape: torch.Size, mask: Tensor | None, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return expand_mask(mask, shape) != 0


def _median(values: Tensor, valid: Tensor) -> Tensor:
    kept = values[valid]
    return kept.median() if kept.numel() else values.new_zeros(())


def tip_quadrants(
    student_entropy: Tensor,
    divergence: Tensor,
    mask: Tensor | None = None,
    *,
    entropy_threshold: float | None = None,
    divergence_threshold: float | None = None,
) -> Tensor:
    """TIP's two-axis taxonomy: quadrant code per token, int64 ``(...)``, -1 at masked tokens.

    A token has high entropy when ``student_entropy > entropy_threshold`` and high divergence when
    ``divergence > divergence_threshold``; thresholds default to the medians over unmasked tokens.
    Codes: :data:`LOW_ENTROPY_LOW_DIVERGENCE` (0), :data:`HIGH_ENTROPY_LOW_DIVERGENCE` (1),
    :data:`LOW_ENTROPY_HIGH_DIVERGENCE` (2), :data:`HIGH_ENTROPY_HIGH_DIVERGENCE` (3).
    """
    if student_entropy.shape != divergence.shape:
        raise ValueError("student_entropy and divergence must have the same shape")
    valid = _valid(student_entropy.shape, mask, student_entropy.device)
    ent = student_entropy.detach()
    div = divergence.detach()
    h_thr = _median(ent, valid) if entropy_threshold is None else entropy_threshold
    d_thr = _median(div, valid) if divergence_threshold is None else divergence_threshold
    codes = (ent > h_thr).long() + 2 * (div > d_thr).long()
    return torch.where(valid, codes, -1)


_TIP_RULES = ("entropy", "divergence", "overconfident", "combined")


def _top_fraction(scores: Tensor, eligible: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` highest ``scores`` among ``eligible`` entries (fewer if not enough)."""
    count = min(count, int(eligible.sum()))
    selected = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        ranked = torch.where(eligible, scores, -math.inf).reshape(-1)
        selected[ranked.topk(count).indices] = True
    return selected.reshape(scores.shape) & eligible


def tip_select(
    student_entropy: Tensor,
    divergence: Tensor,
    mask: Tensor | None = None,
    *,
    keep_fraction: float = 0.5,
    rule: str = "entropy",
) -> Tensor:
    """TIP token selection: a bool mask ``(...)`` keeping about ``keep_fraction`` of the unmasked tokens.

    Rules (selection is global over all unmasked tokens of the batch):

    * ``"entropy"``: the highest student-entropy tokens (TIP: 50% by entropy matches all tokens).
    * ``"divergence"``: the highest teacher-student divergence tokens.
    * ``"overconfident"``: among low-entropy tokens (entropy <= median), the highest-divergence ones;
      at most ``keep_fraction`` of all tokens, fewer if the quadrant is smaller (TIP: < 10% of such
      tokens nearly matches all tokens).
    * ``"combined"``: half the budget by entropy, the other half ``"overconfident"`` among the rest.

    ``keep_fraction`` in [0, 1]; ``ceil(keep_fraction * n)`` tokens are kept. Use the result as (or
    multiply it into) the loss mask. Inputs ``(...)``; neither is differentiated.
    """
    if rule not in _TIP_RULES:
        raise ValueError(f"rule must be one of {_TIP_RULES}, got {rule!r}")
    check_unit_interval("keep_fraction", keep_fraction)
    if student_entropy.shape != divergence.shape:
        raise ValueError("student_entropy and divergence must have the same shape")
    valid = _valid(student_entropy.shape, mask, student_entropy.device)
    ent, div = student_entropy.detach(), divergence.detach()
    budget = math.ceil(keep_fraction * int(valid.sum()))
    if rule == "entropy":
        return _top_fraction(ent, valid, budget)
    if rule == "divergence":
        return _top_fraction(div, valid, budget)
    low_entropy = valid & (ent <= _median(ent, valid))
    if rule == "overconfident":
        return _top_fraction(div, low_entropy, budget)
    by_entropy = _top_fraction(ent, valid, budget // 2)
    rest = _top_fraction(div, low_entropy & ~by_entropy, budget - int(by_entropy.sum()))
    return by_entropy | rest


# ---------------------------------------------------------------------------------------------------
# SCOPE
# ---------------------------------------------------------------------------------------------------


def sequence_log_perplexity(token_logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence log-perplexity ``-mean_t log p(x_t)`` over unmasked tokens: ``(B, T) -> (B,)``.

    A sequence with no unmasked token gets 0. Detached.
    """
    lp = token_logprobs.detach()
    valid = _valid(lp.shape, mask, lp.device).to(lp.dtype)
    total = torch.where(valid != 0, lp, 0.0).sum(-1)
    count = valid.sum(-1)
    return -total / torch.where(count > 0, count, torch.ones_like(count))


def perplexity_weights(
    token_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    group_size: int | None = None,
    invert: bool = False,
    temperature: float = 1.0,
) -> Tensor:
    """SCOPE-style per-sequence weights from perplexity, normalised to mean 1 within each group.

    ``w_i proportional to ppl_i ** (+-1 / temperature)`` within a group of rollouts of the same prompt
    (consecutive rows, ``group_size`` of them; ``None``: the whole batch is one group), computed as
    ``group_size * softmax(+-log ppl / temperature)``. ``invert=False`` weights high-perplexity
    sequences up (SCOPE's correct rollouts, student perplexity: focus on low-confidence samples);
    ``invert=True`` weights low-perplexity sequences up (SCOPE's incorrect rollouts, teacher
    perplexity: trust the teacher where it is confident). Shapes: ``(B, T) -> (B,)``; detached.
    Multiply into the per-sequence loss or broadcast it as a float mask ``w[:, None] * mask``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_ppl = sequence_log_perplexity(token_logprobs, mask)
    batch = log_ppl.shape[0]
    size = batch if group_size is None else group_size
    if size < 1 or batch % size:
        raise ValueError(f"batch of {batch} sequences is not a whole number of groups of {size}")
    scores = (-log_ppl if invert else log_ppl) / temperature
    return (size * torch.softmax(scores.reshape(-1, size), dim=-1)).reshape(batch)


# ---------------------------------------------------------------------------------------------------
# Logit standardisation
# ---------------------------------------------------------------------------------------------------


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score logits over the vocabulary: ``(z - mean(z)) / (std(z) + eps)``, ``(..., V) -> (..., V)``.

    Logit standardisation (Sun et al., CVPR 2024) removes the teacher-student gap in logit scale and
    shift before a KD loss; apply it to both sides, then divide by a base temperature. Uses the
    unbiased standard deviation, like the reference code. Differentiable.
    """
    x = logits.to(compute_dtype(logits))
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True)
    return (x - mean) / (std + eps)
