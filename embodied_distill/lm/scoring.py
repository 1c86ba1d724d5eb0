"""Forward passes at the completion positions, and the teacher's scores in three forms.

The trained positions of a :class:`~embodied_distill.lm.rollout.Rollout` are flattened row-major over
``completion_mask``: ``N = completion_mask.sum()`` rows. Everything here returns tensors over those N
rows, never over the prompt positions (whose logits no loss uses).

Teacher scoring (:func:`score_teacher`, ``mode=``):

* ``"full"``: the teacher's final hidden states ``(N, Ht)`` and its LM head ``(V, Ht)``, so the loss
  forms teacher logits one chunk at a time; or, for models whose logits are not a plain linear map of
  the last hidden state (logit soft-capping or scaling), the logits ``(N, V)``.
* ``"topk"``: the top-k full-vocabulary log-probabilities and their token ids ``(N, k)``
  (:func:`~embodied_distill.losses.teacher_topk`), what an offline cache stores.
* ``"sampled"``: one float per token, the log-probability of the sampled token ``(N,)``
  (:func:`~embodied_distill.losses.token_log_probs`), as the Thinking Machines OPD recipe uses.

Log-probabilities are taken at the loss temperature (the sampling temperature).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embodied_distill.losses import teacher_topk, token_log_probs

from .rollout import Prompts, Rollout, sequence

SCORING_MODES = ("full", "topk", "sampled")

# Config attributes that make logits differ from ``hidden @ lm_head.weight.T`` (Gemma 2/3 soft-capping,
# Cohere / Granite scaling): such models are scored through their own forward pass instead.
_NON_LINEAR_HEAD_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def linear_head(model: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight (V, H), bias (V,) | None)`` when the model's logits are exactly ``h @ W.T + b`` of its
    last hidden state ``h``; ``None`` otherwise."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    config = getattr(model, "config", None)
    for attr in _NON_LINEAR_HEAD_ATTRS:
        value = getattr(config, attr, None)
        if value is not None and value != 1.0:
            return None
    return head.weight, head.bias


def completion_outputs(
    model: nn.Module,
    prompts: Prompts,
    completion: Tensor,
    mask: Tensor,
    *,
    hidden: bool,
    prefix_cache: bool = False,
) -> Tensor:
    """The model's final hidden states ``(B, Tc, H)`` (``hidden=True``) or logits ``(B, Tc, V)`` at the
    positions that predict the completion tokens (columns ``P-1 .. P+Tc-2`` of ``[prompt | completion]``).

    Differentiable when called with gradients enabled; the LM head is applied to these positions only.
    ``prefix_cache``: run the prompts' shared leading tokens (:func:`shared_prefix_length`) once at batch
    1 and attend to their key/value cache from every row (same outputs, to float rounding).
    """
    n = shared_prefix_length(prompts) if prefix_cache else 0
    inputs = None
    if n > 0:
        try:
            inputs, start = _after_shared_prefix(model, prompts, completion, mask, n)
        except (AttributeError, NotImplementedError, TypeError) as e:  # a model without a repeatable cache
            _warn_once(f"prefix cache unavailable for {type(model).__name__} ({e}); plain forward")
    if inputs is None:
        ids, attention, positions = sequence(prompts, completion, mask)
        inputs = {
            "input_ids": ids,
            "attention_mask": attention,
            "position_ids": positions,
            "use_cache": False,
        }
        start = prompts.ids.shape[1] - 1
    stop = start + completion.shape[1]
    if hidden:
        return model.base_model(**inputs).last_hidden_state[:, start:stop]
    keep = torch.arange(start, stop, device=completion.device)
    return model(**inputs, logits_to_keep=keep).logits


def shared_prefix_length(prompts: Prompts) -> int:
    """How many leading tokens every (left-padded) prompt of the batch has in common, capped at the
    shortest prompt's length minus one (the last prompt token must stay outside the prefix: its output
    predicts the first completion token)."""
    lengths = prompts.mask.sum(1).long()
    limit = int(lengths.min()) - 1
    if limit < 1 or prompts.ids.shape[0] < 2:
        return 0
    width = prompts.ids.shape[1]
    start = width - lengths  # first real token of each row
    heads = prompts.ids.gather(1, start[:, None] + torch.arange(limit, device=prompts.ids.device))
    same = (heads == heads[:1]).all(0).long()
    return int(same.cumprod(0).sum())


def _after_shared_prefix(
    model: nn.Module, prompts: Prompts, completion: Tensor, mask: Tensor, n: int
) -> tuple[dict, int]:
    """Run the batch's shared prompt prefix (``n`` tokens) once at batch 1 and repeat its key/value cache
    over the batch; returns the forward inputs of the rest (each prompt without its first ``n`` real
    tokens, then the completion, attending to the cache) and the column predicting the first completion
    token."""
    batch, width = prompts.ids.shape
    lengths = prompts.mask.sum(1).long()
    # transformers >= 5.2x names the key/value cache ``cache``; earlier versions ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    first = width - int(lengths[0])
    prefix = getattr(model.base_model(input_ids=prompts.ids[:1, first : first + n], use_cache=True), name)
    prefix.batch_repeat_interleave(batch)
    # each row without its first n real tokens: [left padding | rest of the prompt], width - n columns
    column = torch.arange(width - n, device=prompts.ids.device)
    pad = (width - lengths)[:, None]
    source = torch.where(column < pad, column, column + n)
    rest_ids, rest_mask = prompts.ids.gather(1, source), prompts.mask.gather(1, source)
    rest_mask = torch.where(column < pad, torch.zeros_like(rest_mask), rest_mask)
    tail = torch.cat([rest_mask, mask.to(rest_mask.dtype)], dim=1)
    inputs = {
        "input_ids": torch.cat([rest_ids, completion], dim=1),
        "attention_mask": torch.cat([rest_mask.new_ones(batch, n), tail], dim=1),
        "position_ids": (n + tail.long().cumsum(1) - 1).clamp_min(0),
        name: prefix,
        "use_cache": True,
    }
    return inputs, width - n - 1


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def flat_positions(values: Tensor, mask: Tensor) -> Tensor:
    """``(B, Tc, ...)`` -> ``(N, ...)``: the rows where ``mask (B, Tc)`` is true, row-major."""
    return values[mask.bool()]


@dataclass
class TeacherScores:
    """The teacher's view of the N trained positions; exactly one form is filled (see module docstring).

    ``hidden (N, Ht)`` with ``weight (V, Ht)`` and ``bias (V,) | None``; or ``logits (N, V)``; or
    ``topk_logprobs`` + ``topk_indices`` ``(N, k)``; or ``token_logprobs (N,)``.
    """

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None
    topk_logprobs: Tensor | None = None
    topk_indices: Tensor | None = None
    token_logprobs: Tensor | None = None

    @property
    def mode(self) -> str:
        """``"full"``, ``"topk"`` or ``"sampled"``."""
        if self.hidden is not None or self.logits is not None:
            return "full"
        if self.topk_logprobs is not None:
            return "topk"
        if self.token_logprobs is not None:
            return "sampled"
        raise ValueError("empty TeacherScores")

    @property
    def num_positions(self) -> int:
        for t in (self.hidden, self.logits, self.topk_logprobs, self.token_logprobs):
            if t is not None:
                return int(t.shape[0])
        return 0

    def select(self, index: Tensor) -> TeacherScores:
        """The scores at a subset of the positions (``index``: bool ``(N,)`` or int ids)."""
        per_position = {"hidden", "logits", "topk_logprobs", "topk_indices", "token_logprobs"}
        return TeacherScores(
            **{
                f.name: (
                    getattr(self, f.name)[index]
                    if f.name in per_position and getattr(self, f.name) is not None
                    else getattr(self, f.name)
                )
                for f in fields(self)
            }
        )

    def logits_chunk(self, start: int, stop: int) -> Tensor:
        """Teacher logits ``(stop - start, V)`` for full scores (formed from hidden states on demand)."""
        if self.logits is not None:
            return self.logits[start:stop]
        if self.hidden is None:
            raise ValueError(f"teacher scores of mode {self.mode!r} hold no logits")
        return F.linear(self.hidden[start:stop], self.weight, self.bias)


@torch.no_grad()
def score_teacher(
    teacher: nn.Module,
    rollout: Rollout,
    mode: str = "full",
    *,
    k: int = 64,
    temperature: float = 1.0,
    chunk_size: int = 256,
    prefix_cache: bool = False,
) -> TeacherScores:
    """Run the teacher on its prompts + the completions and return its scores at the N trained positions.

    ``mode``: ``"full"``, ``"topk"`` (``k`` tokens) or ``"sampled"`` (see module docstring). Top-k and
    sampled log-probabilities are computed ``chunk_size`` positions at a time, so the ``(N, V)`` teacher
    logits never exist at once. ``prefix_cache``: run the prompts' shared leading tokens once
    (:func:`shared_prefix_length`) and reuse their key/value cache across the batch (same scores).
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"teacher scoring mode must be one of {SCORING_MODES}, got {mode!r}")
    head = linear_head(teacher)
    outputs = completion_outputs(
        teacher,
        rollout.teacher_prompts,
        rollout.completion,
        rollout.completion_mask,
        hidden=head is not None,
        prefix_cache=prefix_cache,
    )
    rows = flat_positions(outputs, rollout.completion_mask)
    if head is not None:  # detached: with self-distillation the "teacher" head is the student's parameter
        bias = None if head[1] is None else head[1].detach()
        full = TeacherScores(hidden=rows, weight=head[0].detach(), bias=bias)
    else:
        full = TeacherScores(logits=rows)
    if mode == "full":
        return full
    tokens = flat_positions(rollout.completion, rollout.completion_mask)
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, rows.shape[0], chunk_size):
        logits = full.logits_chunk(start, start + chunk_size)
        if mode == "topk":
            parts.append(teacher_topk(logits, min(k, logits.shape[-1]), temperature))
        else:
            parts.append((token_log_probs(logits, tokens[start : start + chunk_size], temperature),))
    if mode == "topk":
        if not parts:
            empty = rows.new_zeros(0, k)
            return TeacherScores(topk_logprobs=empty, topk_indices=empty.long())
        return TeacherScores(
            topk_logprobs=torch.cat([p[0] for p in parts]), topk_indices=torch.cat([p[1] for p in parts])
        )
    return TeacherScores(token_logprobs=torch.cat([p[0] for p in parts]) if parts else rows.new_zeros(0))


@torch.no_grad()
def sampled_logprobs(
    model: nn.Module, prompts: Prompts, rollout: Rollout, *, temperature: float = 1.0, chunk_size: int = 256
) -> Tensor:
    """Log-probabilities ``(N,)`` of the completion tokens under ``model`` (no gradient), e.g. ExOPD's
    reference model on the student's prompts."""
    scores = score_teacher(
        model,
        Rollout(prompts, prompts, rollout.completion, rollout.completion_mask),
        "sampled",
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return scores.token_logprobs
