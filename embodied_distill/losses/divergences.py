"""Divergences between two categorical distributions given as logits over the last dimension.

Direction convention (the single most common source of bugs in distillation code):

* ``forward_kl``  = KL(T || S) = sum_v p_T(v) (log p_T(v) - log p_S(v))  -- mass-covering (GKD beta=0).
* ``reverse_kl``  = KL(S || T) = sum_v p_S(v) (log p_S(v) - log p_T(v))  -- mode-seeking (OPD, MiniLLM).
* ``generalized_jsd(beta)`` = beta KL(T || M) + (1 - beta) KL(S || M) with M = beta p_T + (1 - beta) p_S,
  the GKD definition; ``beta=0`` returns exactly ``forward_kl`` and ``beta=1`` exactly ``reverse_kl``.

S is the student, T the teacher. Every loss has the signature::

    loss(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", num_items=None)

with logits of shape ``(..., V)`` and a mask of shape ``(...)`` (one entry per position; bool, or float
weights). The per-position values have shape ``(...)`` and are reduced by
:func:`~embodied_distill.losses.reduce.masked_reduce`. The teacher is treated as a constant: its logits
are detached, so no gradient ever reaches the teacher. ``temperature`` divides both sides' logits
(the same temperature must be used when sampling). Half-precision logits are upcast to float32.

Student and teacher vocabularies must match exactly; a mismatch (e.g. Qwen2.5 0.5B with 151936 rows
and 7B with 152064) raises ``ValueError`` instead of silently broadcasting or truncating.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .reduce import Reduction, check_reduction, masked_reduce

# Logits are floored here before log_softmax, so -inf logits (masked vocabulary entries) give
# probability 0 with finite log-probabilities and finite gradients instead of NaN.
LOGIT_FLOOR = -1e30


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The floating dtype losses are evaluated in: at least float32, float64 if any input is float64."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Fail loudly unless student and teacher logits have the same shape (same vocabulary)."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student logits have V={student_logits.shape[-1]}, teacher logits "
            f"V={teacher_logits.shape[-1]}; teacher and student must share the vocabulary exactly "
            "(slice or pad the LM heads explicitly before distilling)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (..., V)"
        )


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_softmax(logits: Tensor, temperature: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last dimension in ``dtype`` (default: float32 or
    float64, see :func:`compute_dtype`); -inf logits are floored to ``LOGIT_FLOOR`` first."""
    check_temperature(temperature)
    x = logits.to(dtype or compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    x = x.clamp_min(LOGIT_FLOOR)
    return F.log_softmax(x, dim=-1)


def log_prob_pair(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Checked ``(log p_S, log p_T)``, each ``(..., V)``; the teacher side is detached."""
    check_pair(student_logits, teacher_logits)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_s = log_softmax(student_logits, temperature, dtype)
    log_t = log_softmax(teacher_logits.detach(), temperature, dtype)
    return log_s, log_t


# ---------------------------------------------------------------------------------------------------
# Element-wise terms over the vocabulary: (..., V) -> (..., V). Summing the last dimension gives the
# divergence. They take log-probabilities, so top-k and chunked variants reuse them on any support.
# ---------------------------------------------------------------------------------------------------


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Terms of KL(p || q): ``p * (log p - log q)``; entries with p = 0 give exactly 0."""
    return log_p.exp() * (log_p - log_q)


def mixture_log_probs(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """``log(beta p_T + (1 - beta) p_S)`` computed in log space (never as log(exp(.) + exp(.))).

    Mixes *probabilities*, not log-probabilities. ``0 < beta < 1``.
    """
    return torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))


def jsd_terms(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Terms of beta KL(T || M) + (1 - beta) KL(S || M), M = beta p_T + (1 - beta) p_S; ``0 < beta < 1``."""
    log_m = mixture_log_probs(log_t, log_s, beta)
    return beta * kl_terms(log_t, log_m) + (1.0 - beta) * kl_terms(log_s, log_m)


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def divergence_terms(log_s: Tensor, log_t: Tensor, divergence: str, beta: float = 0.5) -> Tensor:
    """Element-wise terms of the named divergence (``forward_kl``, ``reverse_kl``, ``generalized_jsd``).

    ``generalized_jsd`` with ``beta`` 0 or 1 gives exactly the forward / reverse KL terms.
    """
    if divergence == "forward_kl":
        return kl_terms(log_t, log_s)
    if divergence == "reverse_kl":
        return kl_terms(log_s, log_t)
    if divergence == "generalized_jsd":
        check_unit_interval("beta", beta)
        if beta == 0.0:
            return kl_terms(log_t, log_s)
        if beta == 1.0:
            return kl_terms(log_s, log_t)
        return jsd_terms(log_s, log_t, beta)
    raise ValueError(
        f"unknown divergence {divergence!r}; choose one of 'forward_kl', 'reverse_kl', 'generalized_jsd'"
    )


# ---------------------------------------------------------------------------------------------------
# Losses on logits.
# ---------------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Forward KL(T || S) per position, reduced over the unmasked positions.

    Shapes: logits ``(..., V)``, mask ``(...)``; returns a scalar, or ``(...)`` for ``reduction="none"``.
    Mass-covering: the student is pushed to put mass wherever the teacher does.
    """
    check_reduction(reduction)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    return masked_reduce(kl_terms(log_t, log_s).sum(-1), mask, reduction, num_items)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Reverse KL(S || T) per position, reduced over the unmasked positions.

    Shapes: logits ``(..., V)``, mask ``(...)``. Mode-seeking: the student is penalised for mass where
    the teacher has little. The full-vocabulary version of the on-policy distillation objective.
    """
    check_reduction(reduction)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    return masked_reduce(kl_terms(log_s, log_t).sum(-1), mask, reduction, num_items)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """GKD's generalized Jensen-Shannon divergence per position.

    ``JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M)`` with the mixture
    ``M = beta p_T + (1 - beta) p_S`` formed in log space (``logaddexp``). ``beta=0`` is exactly
    :func:`forward_kl` KL(T || S) and ``beta=1`` exactly :func:`reverse_kl` KL(S || T); beta is never
    clamped (for 0 < beta < 1 the mixture formula itself tends to 0 at both ends, which is why the
    endpoints are defined as the two KLs). Shapes: logits ``(..., V)``, mask ``(...)``.
    """
    check_reduction(reduction)
    check_unit_interval("beta", beta)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    values = divergence_terms(log_s, log_t, "generalized_jsd", beta).sum(-1)
    return masked_reduce(values, mask, reduction, num_items)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """DistiLLM's skew forward KL: KL(T || alpha p_T + (1 - alpha) p_S) per position.

    ``alpha=0`` is exactly :func:`forward_kl`; ``alpha=1`` is 0. DistiLLM's code minimises the cross-
    entropy ``-sum p_T log(alpha p_T + (1 - alpha) p_S)``, which differs from this value only by the
    teacher's entropy (a constant), so the gradients are identical; this version is 0 at S = T.
    Shapes: logits ``(..., V)``, mask ``(...)``. The gradient flows through the mixture's student part.
    """
    check_reduction(reduction)
    check_unit_interval("alpha", alpha)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    if alpha == 0.0:
        values = kl_terms(log_t, log_s).sum(-1)
    elif alpha == 1.0:
        values = (log_s * 0.0).sum(-1)
    else:
        values = kl_terms(log_t, mixture_log_probs(log_t, log_s, alpha)).sum(-1)
    return masked_reduce(values, mask, reduction, num_items)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """DistiLLM's skew reverse KL: KL(S || alpha p_S + (1 - alpha) p_T) per position.

    ``alpha=0`` is exactly :func:`reverse_kl`; ``alpha=1`` is 0. Shapes: logits ``(..., V)``,
    mask ``(...)``. The gradient flows through both the student term and the mixture.
    """
    check_reduction(reduction)
    check_unit_interval("alpha", alpha)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    if alpha == 0.0:
        values = kl_terms(log_s, log_t).sum(-1)
    elif alpha == 1.0:
        values = (log_s * 0.0).sum(-1)
    else:
        # alpha p_S + (1 - alpha) p_T is the mixture with weight (1 - alpha) on the teacher.
        values = kl_terms(log_s, mixture_log_probs(log_t, log_s, 1.0 - alpha)).sum(-1)
    return masked_reduce(values, mask, reduction, num_items)


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Total variation distance ``0.5 * sum_v |p_S(v) - p_T(v)|`` per position, in [0, 1]; symmetric.

    Shapes: logits ``(..., V)``, mask ``(...)``.
    """
    check_reduction(reduction)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    values = 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)
    return masked_reduce(values, mask, reduction, num_items)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
}


def get_divergence(name: str) -> Callable[..., Tensor]:
    """Look a logits divergence up by name (for configs); lists the valid names on a typo."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; valid: {sorted(DIVERGENCES)}") from None
