"""Prompts -> completions: chat encoding, sampling with ``generate``, and the tensors both models score.

A :class:`Rollout` holds one batch of completions and, separately, the prompt each model sees: the
student's prompt and the teacher's (the same tensors, except in self-distillation, where the teacher's
prompt carries privileged context). Prompts are left-padded to a common length ``P`` and completions
right-padded to ``Tc``, so in ``[prompt | completion]`` the completion always starts at column ``P``
and the hidden states at columns ``P-1 .. P+Tc-2`` predict it, for every row and for either model.

Shapes: prompt ids ``(B, P)``, completion ids ``(B, Tc)``, ``completion_mask (B, Tc)`` (bool: the
tokens up to and including the first end-of-sequence token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .tasks import Example, Message


@dataclass(frozen=True)
class Prompts:
    """Left-padded chat prompts: ``ids (B, P)`` and ``mask (B, P)`` (1 = real token)."""

    ids: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> Prompts:
        return Prompts(self.ids.to(device), self.mask.to(device))


@dataclass(frozen=True)
class Rollout:
    """Completions for a batch of prompts, with the prompt as each model sees it.

    ``source`` says who wrote the completions: ``"student"`` (on-policy), ``"teacher"`` (sequence-level
    KD) or ``"dataset"`` (reference completions).
    """

    student_prompts: Prompts
    teacher_prompts: Prompts
    completion: Tensor
    completion_mask: Tensor
    source: str = "student"

    @property
    def num_tokens(self) -> int:
        """Completion tokens that are trained on (``completion_mask.sum()``)."""
        return int(self.completion_mask.sum())

    def to(self, device: torch.device | str) -> Rollout:
        return replace(
            self,
            student_prompts=self.student_prompts.to(device),
            teacher_prompts=self.teacher_prompts.to(device),
            completion=self.completion.to(device),
            completion_mask=self.completion_mask.to(device),
        )


def encode_chats(tokenizer, chats: Sequence[Sequence[Message]]) -> Prompts:
    """Apply the chat template (with the assistant generation prompt) and left-pad: ``(B, P)``."""
    texts = [
        tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in chats
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return Prompts(enc["input_ids"], enc["attention_mask"])


def encode_examples(
    tokenizer, examples: Sequence[Example], context_template: str | None = None
) -> tuple[Prompts, Prompts]:
    """``(student_prompts, teacher_prompts)``; the teacher's carry each example's privileged ``context``
    (inserted with ``context_template``) when a template is given, else they are the same object."""
    student = encode_chats(tokenizer, [e.messages for e in examples])
    if context_template is None:
        return student, student
    if any(e.context is None for e in examples):
        raise ValueError("self-distillation needs a privileged 'context' for every example")
    teacher = encode_chats(tokenizer, [e.teacher_messages(context_template) for e in examples])
    return student, teacher


def completion_mask(completion: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    """Bool ``(B, Tc)``: every token up to and including the first end-of-sequence token of each row."""
    eos_ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.isin(completion, eos_ids.to(completion.device))
    ended_before = is_eos.long().cumsum(1) - is_eos.long()
    return ended_before == 0


def eos_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus the model's ``generation_config.eos_token_id``."""
    ids = {int(tokenizer.eos_token_id)}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    return sorted(ids)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> Tensor:
    """Sample completions ``(B, Tc)`` (``Tc <= max_new_tokens``) from ``softmax(logits / temperature)``.

    Sampling uses the plain tempered softmax (``top_k=0``, ``top_p=1``): the distribution the loss
    assumes, so sampled-token estimators stay unbiased. Rows that finish early are padded with
    ``pad_token_id`` after their end-of-sequence token. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompts.ids,
            attention_mask=prompts.mask,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else 0,
            top_p=None if greedy else 1.0,
            min_new_tokens=0,
            eos_token_id=list([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id),
            pad_token_id=pad_token_id,
            use_cache=True,
            num_beams=1,
            repetition_penalty=None,
        )
    finally:
        model.train(was_training)
    return out[:, prompts.ids.shape[1] :]


def tokenize_completions(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> Tensor:
    """Reference completions as ids ``(B, Tc)``: each text + the end-of-turn token, right-padded with
    the pad token and truncated to ``max_tokens``."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    if max_tokens is not None:
        rows = [r[:max_tokens] for r in rows]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def sequence(prompts: Prompts, completion: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[prompt | completion]`` as ``(input_ids, attention_mask, position_ids)``, each ``(B, P + Tc)``.

    Positions count real tokens only (``cumsum(mask) - 1``), as ``generate`` does for left-padded
    prompts, so a forward pass reproduces the log-probabilities seen while sampling.
    """
    ids = torch.cat([prompts.ids, completion], dim=1)
    attention = torch.cat([prompts.mask, mask.to(prompts.mask.dtype)], dim=1)
    positions = (attention.long().cumsum(1) - 1).clamp_min(0)
    return ids, attention, positions


def strip_padding(completion: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop trailing columns where every row is already finished."""
    keep = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
    return completion[:, :keep], mask[:, :keep]
