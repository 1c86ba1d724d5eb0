"""Which loss-core function a configuration calls, on which tensors. No loss is defined here.

Every value below comes from :mod:`embodied_distill.losses`; this module only routes the student's
hidden states (or logits) and the :class:`~embodied_distill.lm.scoring.TeacherScores` to it:

=====================  ==============  ============================================================
``loss``               teacher         core function
=====================  ==============  ============================================================
``generalized_jsd``    full            ``generalized_jsd`` (beta: 0 = KL(T||S), 1 = KL(S||T))
``forward_kl``         full            ``forward_kl`` KL(T||S)
``reverse_kl``         full            ``reverse_kl`` KL(S||T)
``skew_forward_kl``    full            ``skew_forward_kl`` (alpha, DistiLLM)
``skew_reverse_kl``    full            ``skew_reverse_kl`` (alpha)
``total_variation``    full            ``total_variation``
``topk_forward_kl``    full            ``topk_forward_kl`` (teacher's top-k, tail bucket / renorm)
``topk_reverse_kl``    full            ``topk_reverse_kl`` (student's top-k)
``topk_jsd``           full            ``topk_jsd`` (union of both top-k)
``taid``               full            ``taid_loss`` (t from ``taid_update``)
``forward_kl``,        topk            ``precomputed_topk_divergence`` on the teacher's top-k
``reverse_kl``,                        (+ tail bucket); what an offline cache holds
``generalized_jsd``
``sampled_reverse_kl`` full / sampled  ``sampled_reverse_kl_surrogate`` (gradient of KL(S||T));
                                       ExOPD (lambda != 1): ``exopd_advantage`` + ``ppo_clip_loss``
=====================  ==============  ============================================================

Paths (``loss_path``) for the logit losses: ``"hidden"`` = :func:`chunked_divergence_from_hidden`
(the ``(N, V)`` logits of neither model ever exist at once), ``"chunked"`` =
:func:`chunked_divergence` on materialised logits, ``"logits"`` = the plain function on materialised
logits (what TRL does). All give the same value and gradient. Every loss is a ``"mean"`` over the
trained tokens with ``num_items`` = the true token count of the whole (accumulated, all-rank) step.

TIP (:func:`tip_mask`) picks the trained tokens from the student's entropy and the per-token divergence
(:func:`~embodied_distill.losses.tip_select`), computed without gradient before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from embodied_distill.losses import (
    DIVERGENCES,
    chunked_divergence,
    chunked_divergence_from_hidden,
    exopd_advantage,
    ppo_clip_loss,
    precomputed_topk_divergence,
    sampled_kl_k1,
    sampled_kl_k3,
    sampled_reverse_kl_surrogate,
    taid_loss,
    tip_select,
    token_entropy,
    token_log_probs,
    topk_forward_kl,
    topk_jsd,
    topk_reverse_kl,
)

from .scoring import TeacherScores

TOPK_LOSSES = {"topk_forward_kl": topk_forward_kl, "topk_reverse_kl": topk_reverse_kl, "topk_jsd": topk_jsd}
FULL_LOSSES = (*DIVERGENCES, *TOPK_LOSSES, "taid")
CACHED_TOPK_LOSSES = ("forward_kl", "reverse_kl", "generalized_jsd")
SAMPLED_LOSSES = ("sampled_reverse_kl",)
LOSSES = (*FULL_LOSSES, *SAMPLED_LOSSES)
LOSS_PATHS = ("hidden", "chunked", "logits")


@dataclass(frozen=True)
class LossSpec:
    """The loss-relevant part of :class:`~embodied_distill.lm.config.DistillConfig`."""

    loss: str = "generalized_jsd"
    beta: float = 0.5
    alpha: float = 0.1
    k: int = 64
    tail: str = "bucket"
    temperature: float = 1.0
    loss_path: str = "hidden"
    chunk_size: int = 256
    exopd_lambda: float = 1.0


@dataclass
class StudentRows:
    """The student at the N trained positions: ``hidden (N, H)`` with its linear head ``weight (V, H)``,
    ``bias``, or (models without a plain head) ``logits (N, V)``; and the completion tokens ``(N,)``."""

    tokens: Tensor
    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None

    def all_logits(self) -> Tensor:
        """``(N, V)`` logits (differentiable), materialised."""
        return self.logits if self.logits is not None else F.linear(self.hidden, self.weight, self.bias)

    def logits_chunk(self, start: int, stop: int) -> Tensor:
        if self.logits is not None:
            return self.logits[start:stop]
        return F.linear(self.hidden[start:stop], self.weight, self.bias)

    def select(self, index: Tensor) -> StudentRows:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return StudentRows(
            tokens=self.tokens[index],
            hidden=pick(self.hidden),
            weight=self.weight,
            bias=self.bias,
            logits=pick(self.logits),
        )

    @property
    def num_positions(self) -> int:
        return int(self.tokens.shape[0])


def _divergence_kwargs(spec: LossSpec, name: str) -> dict:
    if name in ("generalized_jsd", "topk_jsd"):
        kwargs = {"beta": spec.beta}
    elif name in ("skew_forward_kl", "skew_reverse_kl"):
        kwargs = {"alpha": spec.alpha}
    else:
        kwargs = {}
    if name in TOPK_LOSSES:
        kwargs.update(k=spec.k, tail=spec.tail)
    return kwargs


def _logits_divergence(spec: LossSpec, taid_t: float | None):
    """``(callable or name, kwargs)`` of the logits divergence named by ``spec.loss``."""
    if spec.loss == "taid":
        if taid_t is None:
            raise ValueError("the TAID loss needs the current interpolation t")
        return partial(taid_loss, t=taid_t), {}
    if spec.loss in TOPK_LOSSES:
        return TOPK_LOSSES[spec.loss], _divergence_kwargs(spec, spec.loss)
    return DIVERGENCES[spec.loss], _divergence_kwargs(spec, spec.loss)


def distill_loss(
    spec: LossSpec,
    student: StudentRows,
    teacher: TeacherScores,
    *,
    num_items: float | Tensor,
    taid_t: float | None = None,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss over the N rows (a scalar: sum over rows / ``num_items``) and a few detached statistics.

    ``student`` and ``teacher`` cover the same N positions. ``ref_logprobs (N,)`` are the reference
    model's token log-probabilities for ExOPD (``exopd_lambda != 1``).
    """
    stats: dict[str, float] = {}
    if spec.loss in SAMPLED_LOSSES:
        log_s = token_log_probs(student.all_logits(), student.tokens, spec.temperature)
        if teacher.token_logprobs is not None:
            log_t = teacher.token_logprobs
        else:
            log_t = torch.cat(
                [
                    token_log_probs(
                        teacher.logits_chunk(i, i + spec.chunk_size),
                        student.tokens[i : i + spec.chunk_size],
                        spec.temperature,
                    )
                    for i in range(0, max(student.num_positions, 1), spec.chunk_size)
                ]
            )[: student.num_positions]
        with torch.no_grad():
            stats["kl_k1"] = float(sampled_kl_k1(log_s, log_t))
            stats["kl_k3"] = float(sampled_kl_k3(log_s, log_t))
        if spec.exopd_lambda == 1.0:
            loss = sampled_reverse_kl_surrogate(log_s, log_t, num_items=num_items)
        else:
            if ref_logprobs is None:
                raise ValueError("ExOPD (exopd_lambda != 1) needs the reference model's log-probs")
            adv = exopd_advantage(log_s, log_t, ref_logprobs, reward_scale=spec.exopd_lambda)
            loss = ppo_clip_loss(log_s, log_s.detach(), adv, num_items=num_items)
        return loss, stats

    if teacher.mode == "topk":
        if spec.loss not in CACHED_TOPK_LOSSES:
            raise ValueError(
                f"loss {spec.loss!r} needs full teacher logits; with top-k teacher scores use one "
                f"of {CACHED_TOPK_LOSSES}"
            )
        kwargs = {
            "divergence": spec.loss,
            "beta": spec.beta,
            "tail": spec.tail,
            "temperature": spec.temperature,
        }
        if spec.loss_path == "hidden" and student.hidden is not None:
            loss = chunked_divergence_from_hidden(
                student.hidden,
                student.weight,
                student_bias=student.bias,
                teacher_topk=(teacher.topk_logprobs, teacher.topk_indices),
                chunk_size=spec.chunk_size,
                num_items=num_items,
                **kwargs,
            )
        else:
            loss = precomputed_topk_divergence(
                student.all_logits(),
                teacher.topk_logprobs,
                teacher.topk_indices,
                num_items=num_items,
                **kwargs,
            )
        return loss, stats

    if teacher.mode != "full":
        raise ValueError(f"loss {spec.loss!r} needs full or top-k teacher scores, got {teacher.mode!r}")
    fn, kwargs = _logits_divergence(spec, taid_t)
    if spec.loss_path == "hidden" and student.hidden is not None:
        source = (
            {"teacher_hidden": teacher.hidden, "teacher_weight": teacher.weight, "teacher_bias": teacher.bias}
            if teacher.hidden is not None
            else {"teacher_logits": teacher.logits}
        )
        loss = chunked_divergence_from_hidden(
            student.hidden,
            student.weight,
            student_bias=student.bias,
            divergence=fn,
            chunk_size=spec.chunk_size,
            temperature=spec.temperature,
            num_items=num_items,
            **source,
            **kwargs,
        )
        return loss, stats
    s_logits = student.all_logits()
    t_logits = teacher.logits_chunk(0, teacher.num_positions)
    if spec.loss_path == "chunked":
        loss = chunked_divergence(
            s_logits,
            t_logits,
            divergence=fn,
            chunk_size=spec.chunk_size,
            temperature=spec.temperature,
            num_items=num_items,
            **kwargs,
        )
    else:
        loss = fn(s_logits, t_logits, temperature=spec.temperature, num_items=num_items, **kwargs)
    return loss, stats


@torch.no_grad()
def per_token_divergence(
    spec: LossSpec, student: StudentRows, teacher: TeacherScores, taid_t: float | None = None
) -> tuple[Tensor, Tensor]:
    """``(student_entropy (N,), divergence (N,))`` without gradient, ``chunk_size`` rows at a time.

    The divergence is the configured loss per token (``reduction="none"``); for the sampled loss the k3
    estimate of KL(S || T) on the sampled token.
    """
    entropies, divergences = [], []
    for start in range(0, student.num_positions, spec.chunk_size):
        stop = start + spec.chunk_size
        s_logits = student.logits_chunk(start, stop)
        entropies.append(token_entropy(s_logits, spec.temperature))
        if spec.loss in SAMPLED_LOSSES:
            tokens = student.tokens[start:stop]
            log_t = (
                teacher.token_logprobs[start:stop]
                if teacher.token_logprobs is not None
                else token_log_probs(teacher.logits_chunk(start, stop), tokens, spec.temperature)
            )
            log_s = token_log_probs(s_logits, tokens, spec.temperature)
            divergences.append(sampled_kl_k3(log_s, log_t, reduction="none"))
        elif teacher.mode == "topk":
            divergences.append(
                precomputed_topk_divergence(
                    s_logits,
                    teacher.topk_logprobs[start:stop],
                    teacher.topk_indices[start:stop],
                    divergence=spec.loss,
                    beta=spec.beta,
                    tail=spec.tail,
                    temperature=spec.temperature,
                    reduction="none",
                )
            )
        else:
            fn, kwargs = _logits_divergence(spec, taid_t)
            divergences.append(
                fn(
                    s_logits,
                    teacher.logits_chunk(start, stop),
                    temperature=spec.temperature,
                    reduction="none",
                    **kwargs,
                )
            )
    if not entropies:
        empty = student.tokens.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(entropies), torch.cat(divergences)


def tip_mask(
    spec: LossSpec,
    student: StudentRows,
    teacher: TeacherScores,
    *,
    keep_fraction: float,
    rule: str = "entropy",
    taid_t: float | None = None,
) -> Tensor:
    """TIP token selection over the N rows: bool ``(N,)`` (:func:`~embodied_distill.losses.tip_select`)."""
    entropy, divergence = per_token_divergence(spec, student, teacher, taid_t)
    return tip_select(entropy, divergence, keep_fraction=keep_fraction, rule=rule)
