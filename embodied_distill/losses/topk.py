"""Divergences restricted to a top-k support of the vocabulary.

The support is the teacher's top-k (forward KL, mass-covering: where the teacher puts mass), the
student's top-k (reverse KL, mode-seeking: where the student puts mass), or the union of both (JSD).
Outside the support the distributions are handled in one of two ways (``tail=``):

* ``"bucket"``: the mass outside the support is one extra category, ``log(1 - sum_{v in top-k} p(v))``,
  computed as a log-sum-exp over the complement (no cancellation); both distributions stay normalised
  and the value is a true divergence between the coarsened distributions (<= the full divergence).
* ``"renorm"``: both distributions are restricted to the support and renormalised.

With ``k = V`` both modes equal the full-vocabulary loss. Directions, shapes, masks, temperature and
reductions follow :mod:`~embodied_distill.losses.divergences`: logits ``(..., V)``, mask ``(...)``,
teacher detached. The top-k *selection* is not differentiated (indices are constants).

For offline teacher caches (Lightning OPD: teacher log-probs precomputed once over the rollouts) use
:func:`teacher_topk` to build the cache and :func:`precomputed_topk_divergence` to train against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .divergences import (
    LOGIT_FLOOR,
    check_unit_interval,
    compute_dtype,
    divergence_terms,
    log_prob_pair,
    log_softmax,
)
from .reduce import Reduction, check_reduction, masked_reduce

_TAILS = ("bucket", "renorm")


def _check_tail(tail: str) -> None:
    if tail not in _TAILS:
        raise ValueError(f"tail must be one of {_TAILS}, got {tail!r}")


def _check_k(k: int, vocab: int) -> None:
    if not 1 <= k <= vocab:
        raise ValueError(f"k must satisfy 1 <= k <= V={vocab}, got {k}")


def _masked_logsumexp(log_p: Tensor, keep: Tensor) -> Tensor:
    """``log sum_{keep} exp(log_p)`` over the last dim; ~LOGIT_FLOOR (finite, zero grad) when empty."""
    return torch.where(keep, log_p, LOGIT_FLOOR).logsumexp(-1)


def _complement_logsumexp(log_p: Tensor, indices: Tensor) -> Tensor:
    """Log of the probability mass outside ``indices`` (``(..., k)``), ``(..., V) -> (...)``."""
    keep = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, indices, False)
    return _masked_logsumexp(log_p, keep)


def _bucketed(log_p: Tensor, indices: Tensor, tail: str) -> Tensor:
    """``log_p`` ``(..., V)`` coarsened to the k indices (+ a tail bucket): ``(..., k[+1])``."""
    log_k = log_p.gather(-1, indices)
    if tail == "renorm":
        return log_k - log_k.logsumexp(-1, keepdim=True)
    return torch.cat([log_k, _complement_logsumexp(log_p, indices).unsqueeze(-1)], dim=-1)


def _topk_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    *,
    k: int,
    tail: str,
    temperature: float,
    reduction: Reduction,
    num_items: float | Tensor | None,
    on_teacher: bool,
) -> Tensor:
    check_reduction(reduction)
    _check_tail(tail)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    _check_k(k, log_s.shape[-1])
    ranked = log_t if on_teacher else log_s.detach()
    indices = ranked.topk(k, dim=-1).indices
    log_s_b, log_t_b = _bucketed(log_s, indices, tail), _bucketed(log_t, indices, tail)
    divergence = "forward_kl" if on_teacher else "reverse_kl"
    values = divergence_terms(log_s_b, log_t_b, divergence).sum(-1)
    return masked_reduce(values, mask, reduction, num_items)


def topk_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    k: int,
    tail: str = "bucket",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Forward KL(T || S) on the teacher's top-k tokens (+ tail bucket or renormalised).

    Shapes: logits ``(..., V)``, mask ``(...)``; ``k = V`` equals :func:`forward_kl`.
    """
    return _topk_loss(
        student_logits, teacher_logits, mask, k=k, tail=tail, temperature=temperature,
        reduction=reduction, num_items=num_items, on_teacher=True,
    )  # fmt: skip


def topk_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    k: int,
    tail: str = "bucket",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Reverse KL(S || T) on the student's top-k tokens (+ tail bucket or renormalised).

    Shapes: logits ``(..., V)``, mask ``(...)``; ``k = V`` equals :func:`reverse_kl`.
    """
    return _topk_loss(
        student_logits, teacher_logits, mask, k=k, tail=tail, temperature=temperature,
        reduction=reduction, num_items=num_items, on_teacher=False,
    )  # fmt: skip


def topk_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    k: int,
    beta: float = 0.5,
    tail: str = "bucket",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Generalized JSD(beta) on the union of the teacher's and the student's top-k tokens.

    Same definition and endpoints as :func:`generalized_jsd` (beta=0: KL(T || S), beta=1: KL(S || T)),
    evaluated on the coarsened distributions. The union has between k and 2k tokens per position.
    Shapes: logits ``(..., V)``, mask ``(...)``; ``k = V`` equals :func:`generalized_jsd`.
    """
    check_reduction(reduction)
    _check_tail(tail)
    check_unit_interval("beta", beta)
    log_s, log_t = log_prob_pair(student_logits, teacher_logits, temperature)
    _check_k(k, log_s.shape[-1])
    support = torch.zeros_like(log_s, dtype=torch.bool)
    support.scatter_(-1, log_t.topk(k, dim=-1).indices, True)
    support.scatter_(-1, log_s.detach().topk(k, dim=-1).indices, True)
    if tail == "renorm":
        log_s = log_s - _masked_logsumexp(log_s, support).unsqueeze(-1)
        log_t = log_t - _masked_logsumexp(log_t, support).unsqueeze(-1)
    terms = divergence_terms(log_s, log_t, "generalized_jsd", beta)
    values = torch.where(support, terms, 0.0).sum(-1)
    if tail == "bucket":
        tail_s = _masked_logsumexp(log_s, ~support).unsqueeze(-1)
        tail_t = _masked_logsumexp(log_t, ~support).unsqueeze(-1)
        values = values + divergence_terms(tail_s, tail_t, "generalized_jsd", beta).squeeze(-1)
    return masked_reduce(values, mask, reduction, num_items)


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Build an offline teacher cache: the top-k ``(log_probs, indices)``, each ``(..., k)``.

    ``log_probs`` are full-vocabulary log-probabilities (float32, or float64 for float64 input) at
    ``temperature``, sorted descending; ``indices`` are int64. Computed without gradient.
    """
    _check_k(k, teacher_logits.shape[-1])
    with torch.no_grad():
        values, indices = log_softmax(teacher_logits.detach(), temperature).topk(k, dim=-1)
    return values, indices


def precomputed_topk_divergence(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Divergence between the student and a cached teacher top-k, on the teacher's top-k support.

    Args:
        student_logits: ``(..., V)``.
        teacher_topk_logprobs: ``(..., k)`` full-vocabulary teacher log-probabilities at the cached
            tokens (as returned by :func:`teacher_topk`; store them in float32).
        teacher_topk_indices: ``(..., k)`` token ids, distinct per position.
        mask: ``(...)``.
        divergence: ``"forward_kl"`` KL(T || S), ``"reverse_kl"`` KL(S || T) or ``"generalized_jsd"``
            (with ``beta``), all on the coarsened distributions.
        tail: ``"bucket"``: the teacher's tail is ``log(1 - sum exp(cached))`` (clamped at 0 mass), the
            student's the log-sum-exp over the uncached tokens; with ``k = V`` there is no tail and the
            value equals the full divergence. ``"renorm"``: both renormalised over the k tokens.
        temperature: applied to the student logits only; the cache must have been built at the same
            temperature (the cached log-probs cannot be re-tempered).
    """
    check_reduction(reduction)
    _check_tail(tail)
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape:
        raise ValueError("teacher top-k log-probs and indices must have the same shape (..., k)")
    if teacher_topk_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher cache {tuple(teacher_topk_logprobs.shape)} does not match the positions of the "
            f"student logits {tuple(student_logits.shape)}"
        )
    vocab, k = student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    _check_k(k, vocab)
    dtype = compute_dtype(student_logits, teacher_topk_logprobs)
    log_s = log_softmax(student_logits, temperature, dtype)
    indices = teacher_topk_indices.long()
    log_t_k = teacher_topk_logprobs.detach().to(dtype).clamp_min(LOGIT_FLOOR)
    log_s_k = log_s.gather(-1, indices)
    if tail == "renorm":
        log_s_b = log_s_k - log_s_k.logsumexp(-1, keepdim=True)
        log_t_b = log_t_k - log_t_k.logsumexp(-1, keepdim=True)
    elif k == vocab:
        log_s_b, log_t_b = log_s_k, log_t_k
    else:
        covered = log_t_k.logsumexp(-1).clamp_max(0.0)
        tail_t = torch.log(-torch.expm1(covered)).clamp_min(LOGIT_FLOOR)
        log_t_b = torch.cat([log_t_k, tail_t.unsqueeze(-1)], dim=-1)
        log_s_b = torch.cat([log_s_k, _complement_logsumexp(log_s, indices).unsqueeze(-1)], dim=-1)
    values = divergence_terms(log_s_b, log_t_b, divergence, beta).sum(-1)
    return masked_reduce(values, mask, reduction, num_items)
