"""Reverse KL on sampled tokens: the on-policy distillation signal (Thinking Machines / MiniLLM, VLA-OPD).

The student samples token (or action-token) ``x ~ p_S``; the teacher scores it. With
``log r = log p_T(x) - log p_S(x)``:

* ``k1 = -log r = log p_S(x) - log p_T(x)``: unbiased estimate of KL(S || T), can be negative.
* ``k3 = (r - 1) - log r``: unbiased estimate of KL(S || T), always >= 0, lower variance when p_S ~ p_T.

Both are *value* estimators. Differentiating them on the samples does **not** give the gradient of
KL(S || T): the gradient of k1 is the score ``grad log p_S(x)`` (mean 0), and the gradient of k3 is
an unbiased estimate of grad KL(T || S), the *forward* KL. For a differentiable reverse-KL objective
on samples use :func:`sampled_reverse_kl_surrogate` (score-function form) or feed
:func:`opd_advantage` to a policy-gradient loss (``ppo_clip_loss``), as OPD does.

Shapes: per-token log-probabilities ``(...)`` (e.g. ``(B, T)``), mask ``(...)``; logits ``(..., V)``
with token ids ``(...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .divergences import compute_dtype, log_softmax
from .reduce import Reduction, check_reduction, masked_reduce


def token_log_probs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[token_ids]``: ``(..., V)`` and ``(...)`` -> ``(...)``.

    Differentiable with respect to ``logits``. Use the temperature that was used for sampling.
    """
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_ids of shape {tuple(token_ids.shape)} must match logits {tuple(logits.shape)}[:-1]"
        )
    log_p = log_softmax(logits, temperature)
    return log_p.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def _check_same_shape(student_logprobs: Tensor, teacher_logprobs: Tensor) -> None:
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student log-probs {tuple(student_logprobs.shape)} and teacher log-probs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape"
        )


def sampled_kl_k1(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """k1 estimate of KL(S || T): ``log p_S(x) - log p_T(x)`` on tokens sampled from the student.

    Args: per-token log-probabilities of the sampled tokens, ``(...)`` each; mask ``(...)``.
    The teacher side is detached.
    """
    check_reduction(reduction)
    _check_same_shape(student_logprobs, teacher_logprobs)
    return masked_reduce(student_logprobs - teacher_logprobs.detach(), mask, reduction, num_items)


def sampled_kl_k3(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
    max_log_ratio: float = 30.0,
) -> Tensor:
    """k3 estimate of KL(S || T): ``exp(log r) - 1 - log r`` with ``log r = log p_T(x) - log p_S(x)``.

    Non-negative per token; unbiased for KL(S || T) on tokens sampled from the student. ``expm1``
    keeps it accurate when p_S ~ p_T. Its gradient estimates grad KL(T || S) (see module docstring).
    Shapes ``(...)``; the teacher side is detached; evaluated in float32 (float64 for float64 input).

    ``log r`` is clamped at ``max_log_ratio`` so that a token to which the student gives e^30 times
    less probability than the teacher cannot overflow to inf. The student essentially never samples
    such tokens, so the estimator's expectation moves by at most the teacher's mass on them (and those
    tokens get no gradient).
    """
    check_reduction(reduction)
    _check_same_shape(student_logprobs, teacher_logprobs)
    dtype = compute_dtype(student_logprobs, teacher_logprobs)
    log_r = (teacher_logprobs.detach().to(dtype) - student_logprobs.to(dtype)).clamp_max(max_log_ratio)
    return masked_reduce(torch.expm1(log_r) - log_r, mask, reduction, num_items)


def sampled_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    token_ids: Tensor,
    mask: Tensor | None = None,
    *,
    estimator: str = "k3",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """k1 / k3 estimate of KL(S || T) from full logits ``(..., V)`` at sampled ``token_ids`` ``(...)``."""
    if estimator not in ("k1", "k3"):
        raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student V={student_logits.shape[-1]}, teacher V={teacher_logits.shape[-1]}"
        )
    log_s = token_log_probs(student_logits, token_ids, temperature)
    log_t = token_log_probs(teacher_logits.detach(), token_ids, temperature)
    fn = sampled_kl_k1 if estimator == "k1" else sampled_kl_k3
    return fn(log_s, log_t, mask, reduction=reduction, num_items=num_items)


def opd_advantage(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float = 1.0,
) -> Tensor:
    """Per-token on-policy-distillation advantage ``scale * (log p_T(x) - log p_S(x))`` = ``-scale * k1``.

    Detached, shape ``(...)``, exactly 0 at masked tokens. Maximising ``E[A log p_S]`` with it is
    policy-gradient descent on KL(S || T) (Thinking Machines' OPD; VLA-OPD's r_t). For ExOPD's reward
    extrapolation with a reference model see :func:`~embodied_distill.losses.weighting.exopd_advantage`.
    """
    _check_same_shape(student_logprobs, teacher_logprobs)
    adv = scale * (teacher_logprobs.detach() - student_logprobs.detach())
    return masked_reduce(adv, mask, "none")


def sampled_reverse_kl_surrogate(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Score-function surrogate whose gradient is an unbiased estimate of grad KL(S || T).

    Per token ``stopgrad(log p_S(x) - log p_T(x)) * log p_S(x)`` on ``x ~ p_S``, shapes ``(...)``.
    Its *value* is not the KL (use :func:`sampled_kl_k3` to log that); only its gradient is meaningful:
    ``E_S[(log p_S - log p_T) grad log p_S] = grad KL(S || T)``.
    """
    check_reduction(reduction)
    _check_same_shape(student_logprobs, teacher_logprobs)
    coef = student_logprobs.detach() - teacher_logprobs.detach()
    return masked_reduce(coef * student_logprobs, mask, reduction, num_items)
