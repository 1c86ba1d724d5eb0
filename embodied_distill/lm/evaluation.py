"""Held-out evaluation: greedy exact-match accuracy, and the student's divergence from the teacher.

``exact_match_accuracy`` decodes greedily (the deterministic answer a user would get) and scores each
response with :func:`~embodied_distill.lm.tasks.exact_match`. ``divergence_to_teacher`` measures, on
fixed prompts, the mean per-token reverse KL(S || T) (and forward KL(T || S)) over the student's own
greedy completions: the quantity on-policy distillation minimises, without sampling noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embodied_distill.losses import forward_kl, reverse_kl

from .rollout import Rollout, completion_mask, encode_chats, encode_examples, eos_ids, generate, strip_padding
from .scoring import completion_outputs, flat_positions
from .tasks import Example


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[str]:
    """Greedy responses (decoded, special tokens removed) to each example's messages."""
    device = next(model.parameters()).device
    eos = eos_ids(tokenizer, model)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = encode_chats(tokenizer, [e.messages for e in chunk]).to(device)
        completion = generate(
            model, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, greedy=True
        )
        out.extend(tokenizer.batch_decode(completion, skip_special_tokens=True))
    return out


def exact_match_accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    samples: int = 5,
) -> dict:
    """``{"accuracy", "correct", "n", "samples": [(prompt, response, answer), ...]}`` on ``examples``
    (those with an ``answer``); greedy decoding."""
    from .tasks import exact_match

    scored = [e for e in examples if e.answer is not None]
    if not scored:
        raise ValueError("no example has a reference answer; exact-match needs 'answer'")
    responses = generate_responses(
        model, tokenizer, scored, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    hits = [exact_match(r, e.answer, e.kind) for r, e in zip(responses, scored)]
    return {
        "accuracy": sum(hits) / len(hits),
        "correct": int(sum(hits)),
        "n": len(hits),
        "samples": [(e.prompt, r, e.answer) for e, r in list(zip(scored, responses))[:samples]],
    }


@torch.no_grad()
def divergence_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    temperature: float = 1.0,
    context_template: str | None = None,
    samples: int = 0,
) -> dict[str, float]:
    """Mean per-token ``reverse_kl`` KL(S || T) and ``forward_kl`` KL(T || S) over the student's greedy
    completions of ``examples`` (weighted by token count); with ``samples > 0``, over that many sampled
    completions per example instead (the expected on-policy divergence, without greedy decoding's jumps)."""
    if samples:
        examples = [e for e in examples for _ in range(samples)]
    device = next(student.parameters()).device
    eos = eos_ids(tokenizer, student)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    totals = {"reverse_kl": 0.0, "forward_kl": 0.0}
    tokens = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        s_prompts, t_prompts = encode_examples(tokenizer, chunk, context_template)
        s_prompts, t_prompts = s_prompts.to(device), t_prompts.to(device)
        completion = generate(
            student,
            s_prompts,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            greedy=not samples,
            temperature=temperature,
        )
        completion, mask = strip_padding(completion, completion_mask(completion, eos))
        rollout = Rollout(s_prompts, t_prompts, completion, mask)
        s = flat_positions(completion_outputs(student, s_prompts, completion, mask, hidden=False), mask)
        t = flat_positions(completion_outputs(teacher, t_prompts, completion, mask, hidden=False), mask)
        n = rollout.num_tokens
        totals["reverse_kl"] += float(reverse_kl(s, t, temperature=temperature, reduction="sum"))
        totals["forward_kl"] += float(forward_kl(s, t, temperature=temperature, reduction="sum"))
        tokens += n
    return {k: v / max(tokens, 1) for k, v in totals.items()} | {"tokens": float(tokens)}
