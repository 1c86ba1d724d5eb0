"""Divergences evaluated a chunk of positions at a time, so peak memory does not grow with N x V.

A full-vocabulary divergence on N positions builds several ``(N, V)`` temporaries (log-softmax of both
sides, the mixture, the terms) and autograd keeps most of them for the backward pass. For 8 x 512
tokens and a 49k vocabulary each one is 0.8 GB in float32. Two tools bound this:

* :func:`chunked_divergence` takes the logits and evaluates any per-position loss ``chunk_size`` rows at
  a time. The forward pass keeps nothing but its inputs; the backward pass recomputes one chunk at a
  time and writes its gradient into a single ``(N, V)`` buffer (the gradient itself). Values and
  gradients equal the unchunked loss (same arithmetic, row by row).
* :func:`chunked_divergence_from_hidden` takes hidden states and LM-head weights, so the ``(N, V)``
  logits never exist at once: per chunk it forms both sides' logits, the loss and its gradient, and
  accumulates the gradients of the hidden states, head weight and bias during the forward pass (the
  backward pass only scales them). Peak memory is a few ``(chunk_size, V)`` blocks.

Per-position losses must depend on their own row only (true for every loss in this package). Both
functions support a single differentiation (no double backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .divergences import DIVERGENCES, check_pair, check_temperature, compute_dtype
from .reduce import Reduction, check_reduction, masked_reduce, reduction_weights
from .topk import precomputed_topk_divergence, topk_forward_kl, topk_jsd, topk_reverse_kl

RowLoss = Callable[..., Tensor]

CHUNKABLE: dict[str, Callable[..., Tensor]] = {
    **DIVERGENCES,
    "topk_forward_kl": topk_forward_kl,
    "topk_reverse_kl": topk_reverse_kl,
    "topk_jsd": topk_jsd,
}


def _resolve(divergence: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    if callable(divergence):
        return divergence
    try:
        return CHUNKABLE[divergence]
    except KeyError:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {sorted(CHUNKABLE)}") from None


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


class _ChunkedRows(torch.autograd.Function):
    """values[i] = row_fn(student[i], *teacher[i]); backward recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, row_fn: RowLoss, chunk_size: int, student: Tensor, *teacher: Tensor) -> Tensor:
        ctx.row_fn, ctx.chunk_size = row_fn, chunk_size
        ctx.save_for_backward(student, *teacher)
        parts = []
        for start in range(0, student.shape[0], chunk_size):
            stop = start + chunk_size
            parts.append(row_fn(student[start:stop], *(t[start:stop] for t in teacher)))
        if not parts:
            return student.new_zeros(0, dtype=compute_dtype(student))
        return torch.cat(parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor):
        student, *teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            upstream = grad_values[start:stop]
            if not bool(upstream.any()):  # e.g. an all-padding chunk
                grad[start:stop] = 0
                continue
            rows = student[start:stop].detach().requires_grad_(True)
            with torch.enable_grad():
                values = ctx.row_fn(rows, *(t[start:stop] for t in teacher))
            (grad[start:stop],) = torch.autograd.grad(values, rows, grad_outputs=upstream)
        return (None, None, grad) + (None,) * len(teacher)


def chunked_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    divergence: str | Callable[..., Tensor] = "generalized_jsd",
    chunk_size: int = 256,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
    **divergence_kwargs,
) -> Tensor:
    """Any per-position divergence on logits ``(..., V)``, evaluated ``chunk_size`` positions at a time.

    Args:
        student_logits, teacher_logits: ``(..., V)``; the teacher is a constant.
        mask: ``(...)``.
        divergence: a name from :data:`CHUNKABLE` (e.g. ``"generalized_jsd"``, ``"reverse_kl"``,
            ``"topk_forward_kl"``) or a callable with the divergence signature
            ``fn(student_logits, teacher_logits, mask, *, temperature, reduction, **kwargs)``.
        divergence_kwargs: forwarded to the divergence (``beta=``, ``alpha=``, ``k=``, ``tail=``).

    Returns the same value as ``divergence(student_logits, teacher_logits, mask, ...)`` (and the same
    gradient with respect to the student logits), with loss temporaries bounded by ``chunk_size x V``.
    """
    check_reduction(reduction)
    check_temperature(temperature)
    _check_chunk_size(chunk_size)
    fn = _resolve(divergence)
    check_pair(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]

    def row_fn(s: Tensor, t: Tensor) -> Tensor:
        return fn(s, t, None, temperature=temperature, reduction="none", **divergence_kwargs)

    values = _ChunkedRows.apply(
        row_fn, chunk_size, student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    )
    return masked_reduce(values.reshape(student_logits.shape[:-1]), mask, reduction, num_items)


class _HiddenRows(torch.autograd.Function):
    """sum_i w_i * row_fn(h_i W^T + b, *teacher_i), with gradients accumulated during the forward pass."""

    @staticmethod
    def forward(
        ctx,
        row_fn: RowLoss,
        teacher_chunk: Callable[[int, int], tuple[Tensor, ...]],
        chunk_size: int,
        weights: Tensor,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        need_b = bias is not None and ctx.needs_input_grad[6]
        need_any = need_h or need_w or need_b
        acc_dtype = compute_dtype(weight)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=compute_dtype(hidden, weight), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            w = weights[start:stop]
            if not bool(w.any()):  # every position of the chunk is masked: nothing to compute
                continue
            rows = hidden[start:stop]
            logits = rows @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits.requires_grad_(need_any)
            with torch.enable_grad():
                values = row_fn(logits, *teacher_chunk(start, stop))
                chunk_total = torch.where(w != 0, values * w.to(values.dtype), 0.0).sum()
            if need_any:
                (g,) = torch.autograd.grad(chunk_total, logits)
                if need_h:
                    grad_h[start:stop] = g @ weight
                if need_w:
                    grad_w.addmm_(g.t().to(acc_dtype), rows.to(acc_dtype))
                if need_b:
                    grad_b += g.sum(0).to(acc_dtype)
            total += chunk_total.detach()
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        grads = tuple(None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads)
        return (None, None, None, None) + grads


def chunked_divergence_from_hidden(
    student_hidden: Tensor,
    student_weight: Tensor,
    mask: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    divergence: str | Callable[..., Tensor] = "generalized_jsd",
    chunk_size: int = 256,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
    **divergence_kwargs,
) -> Tensor:
    """Divergence between student and teacher from hidden states; logits exist one chunk at a time.

    Student logits are ``student_hidden @ student_weight.T (+ student_bias)``. Give the teacher as
    exactly one of: ``teacher_hidden`` + ``teacher_weight`` (+ ``teacher_bias``), ``teacher_logits``
    ``(..., V)``, or ``teacher_topk = (log_probs, indices)`` ``(..., k)`` (an offline cache, see
    :func:`~embodied_distill.losses.topk.teacher_topk`; ``divergence`` is then one of
    ``"forward_kl"``, ``"reverse_kl"``, ``"generalized_jsd"`` on the cached support, ``tail=`` allowed).

    Shapes: ``student_hidden (..., H)``, ``student_weight (V, H)``, ``student_bias (V,)``,
    ``teacher_hidden (..., Ht)``, ``teacher_weight (V, Ht)``, mask ``(...)``.

    Returns the scalar loss for ``reduction="mean"`` / ``"sum"``, differentiable with respect to the
    student hidden states, weight and bias (the teacher is a constant). ``reduction="none"`` returns the
    per-position values ``(...)`` and is only allowed when no gradient is needed (the fused backward
    folds the reduction weights into the forward pass).
    """
    check_reduction(reduction)
    check_temperature(temperature)
    _check_chunk_size(chunk_size)
    hidden_dim = student_hidden.shape[-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden_dim:
        raise ValueError(f"student_weight must be (V, H={hidden_dim}), got {tuple(student_weight.shape)}")
    vocab = student_weight.shape[0]
    positions = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, hidden_dim)
    n_rows = hidden.shape[0]

    sources = [teacher_hidden is not None, teacher_logits is not None, teacher_topk is not None]
    if sum(sources) != 1:
        raise ValueError(
            "give exactly one of teacher_hidden (+ teacher_weight), teacher_logits, teacher_topk"
        )
    if teacher_hidden is not None:
        if teacher_weight is None or teacher_weight.dim() != 2:
            raise ValueError("teacher_hidden needs teacher_weight of shape (V, Ht)")
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"vocabulary mismatch: student head has V={vocab}, teacher head V={teacher_weight.shape[0]}"
            )
        if teacher_hidden.shape[:-1] != positions:
            raise ValueError("teacher_hidden must cover the same positions as student_hidden")
        t_hidden = teacher_hidden.detach().reshape(n_rows, -1)
        t_weight = teacher_weight.detach()
        t_bias = None if teacher_bias is None else teacher_bias.detach()

        def teacher_chunk(start: int, stop: int) -> tuple[Tensor, ...]:
            logits = t_hidden[start:stop] @ t_weight.t()
            return (logits if t_bias is None else logits + t_bias,)

    elif teacher_logits is not None:
        if teacher_logits.shape != positions + (vocab,):
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} must be {tuple(positions) + (vocab,)} "
                "(same positions and vocabulary as the student)"
            )
        t_logits = teacher_logits.detach().reshape(n_rows, vocab)

        def teacher_chunk(start: int, stop: int) -> tuple[Tensor, ...]:
            return (t_logits[start:stop],)

    else:
        log_probs, indices = teacher_topk
        if log_probs.shape[:-1] != positions or indices.shape != log_probs.shape:
            raise ValueError(
                "teacher_topk (log_probs, indices) must both be (..., k) over the same positions"
            )
        t_lp = log_probs.detach().reshape(n_rows, -1)
        t_idx = indices.reshape(n_rows, -1)

        def teacher_chunk(start: int, stop: int) -> tuple[Tensor, ...]:
            return (t_lp[start:stop], t_idx[start:stop])

    if teacher_topk is not None:
        if not isinstance(divergence, str):
            raise ValueError("with teacher_topk, divergence must be a name ('forward_kl', 'reverse_kl', ...)")

        def row_fn(s: Tensor, lp: Tensor, idx: Tensor) -> Tensor:
            return precomputed_topk_divergence(
                s, lp, idx, None, divergence=divergence, temperature=temperature, reduction="none",
                **divergence_kwargs,
            )  # fmt: skip

    else:
        fn = _resolve(divergence)

        def row_fn(s: Tensor, t: Tensor) -> Tensor:
            return fn(s, t, None, temperature=temperature, reduction="none", **divergence_kwargs)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    if reduction == "none" and needs_grad:
        raise ValueError(
            "reduction='none' is only available without gradients (under torch.no_grad() or on "
            "detached inputs); use 'mean' / 'sum' with a float mask for per-position weights"
        )
    if not needs_grad:  # plain chunked evaluation, no gradient bookkeeping
        with torch.no_grad():
            parts = []
            for start in range(0, n_rows, chunk_size):
                stop = start + chunk_size
                logits = hidden[start:stop] @ student_weight.t()
                if student_bias is not None:
                    logits = logits + student_bias
                parts.append(row_fn(logits, *teacher_chunk(start, stop)))
            values = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=compute_dtype(hidden))
        return masked_reduce(values.reshape(positions), mask, reduction, num_items)

    weights = reduction_weights(
        mask, positions, reduction, num_items, dtype=compute_dtype(hidden, student_weight),
        device=hidden.device,
    ).reshape(n_rows)  # fmt: skip
    return _HiddenRows.apply(row_fn, teacher_chunk, chunk_size, weights, hidden, student_weight, student_bias)
