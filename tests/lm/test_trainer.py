"""The Distiller: steps lower the divergence on fixed prompts, gradient accumulation is normalised by the
true token count, offline caches round-trip exactly and match the live teacher."""

import copy

import pytest
import torch
from lm_helpers import make_cfg

from embodied_distill.lm.evaluation import divergence_to_teacher
from embodied_distill.lm.models import layer_subset_student
from embodied_distill.lm.offline import TeacherCache, score_for_cache, tokenizer_fingerprint
from embodied_distill.lm.rollout import Rollout, completion_mask, encode_examples, tokenize_completions
from embodied_distill.lm.scoring import score_teacher
from embodied_distill.lm.trainer import Distiller, _MicroBatch


def _kl(student, teacher, tokenizer, examples):
    """The expected on-policy reverse KL(S || T) per token on the fixed prompts (16 samples each)."""
    return divergence_to_teacher(student, teacher, tokenizer, examples, max_new_tokens=6, samples=16)[
        "reverse_kl"
    ]


@pytest.mark.parametrize(
    "distill",
    [
        {"loss": "generalized_jsd", "lmbda": 0.5},
        {"loss": "sampled_reverse_kl", "teacher_scoring": "sampled", "lmbda": 1.0},
        {"loss": "reverse_kl", "lmbda": 1.0, "tip_fraction": 0.5},
        {"loss": "taid", "lmbda": 0.0, "seq_kd": True},
        {"loss": "generalized_jsd", "teacher_scoring": "topk", "k": 8, "lmbda": 1.0, "loss_path": "logits"},
    ],
    ids=["gkd", "opd", "tip", "taid_seqkd", "topk"],
)
def test_a_few_steps_lower_the_divergence_on_fixed_prompts(tokenizer, teacher, examples, distill):
    student = layer_subset_student(teacher, [0])  # as in the real setting: a few of the teacher's layers
    before = _kl(student, teacher, tokenizer, examples)
    distiller = Distiller(student, tokenizer, teacher, examples, make_cfg(steps=24, **distill))
    metrics = [distiller.step() for _ in range(24)]
    after = _kl(student, teacher, tokenizer, examples)
    assert after < 0.85 * before, (before, after)
    assert all(m["tokens"] > 0 and m["grad_norm"] > 0 for m in metrics)
    if distill.get("tip_fraction"):  # TIP trains on half of the completion tokens (8 prompts x <= 6 tokens)
        assert all(m["tokens"] <= 24 for m in metrics)
    if distill["loss"] == "taid":
        assert metrics[-1]["taid_t"] > metrics[0]["taid_t"] >= 0.4


def test_the_distiller_applies_the_configured_mmap_threshold(tokenizer, teacher, student, examples):
    import dataclasses

    from embodied_distill import memory

    if memory._glibc() is None:
        pytest.skip("the policy is glibc's mallopt")
    cfg = make_cfg()
    Distiller(
        student,
        tokenizer,
        teacher,
        examples,
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mmap_threshold_mib=2.0)),
    )
    assert memory._applied == 2.0
    Distiller(student, tokenizer, teacher, examples, cfg)  # the default: 1 MiB
    assert memory._applied == 1.0


def test_lambda_decides_who_writes_the_completions(tokenizer, teacher, student, examples):
    d = Distiller(student, tokenizer, teacher, examples, make_cfg(lmbda=0.3))
    sources = [d.choose_source(s) for s in range(400)]
    assert 0.22 < sources.count("student") / 400 < 0.38 and set(sources) == {"student", "dataset"}
    d = Distiller(student, tokenizer, teacher, examples, make_cfg(lmbda=0.0, seq_kd=True))
    assert {d.choose_source(s) for s in range(50)} == {"teacher"}


def _dataset_batch(d: Distiller, tokenizer, examples) -> _MicroBatch:
    rollout = d.make_rollout(examples, "dataset")
    return _MicroBatch(rollout, score_teacher(d.teacher, rollout, "full"), None, None, rollout.num_tokens)


def _grads(d):
    return torch.cat([p.grad.flatten().clone() for p in d.params])


def test_gradient_accumulation_is_normalised_by_the_true_token_count(tokenizer, teacher, student, examples):
    """Two micro-batches with different token counts accumulate to the gradient of one big batch."""
    for i, e in enumerate(examples):  # completions of very different lengths
        object.__setattr__(e, "completion", e.completion * (1 + 3 * (i % 2 == 0)))
    short, long_ = [examples[1], examples[3]], [examples[0], examples[2], examples[4]]
    d = Distiller(student, tokenizer, teacher, examples, make_cfg(loss="forward_kl", max_new_tokens=64))
    mb_short, mb_long = _dataset_batch(d, tokenizer, short), _dataset_batch(d, tokenizer, long_)
    assert mb_long.num_tokens > 2 * mb_short.num_tokens

    d.backward([_dataset_batch(d, tokenizer, short + long_)])
    big = _grads(d)
    d.optimizer.zero_grad()
    loss, _, total = d.backward([mb_short, mb_long])
    accumulated = _grads(d)
    assert total == mb_short.num_tokens + mb_long.num_tokens
    assert torch.allclose(accumulated, big, atol=1e-6, rtol=1e-4)

    # the naive per-micro-batch mean (what a plain loss.mean() / grad_accum gives) is measurably different
    d.optimizer.zero_grad()
    for mb in (mb_short, mb_long):
        d.backward([mb])  # normalised by its own token count
    naive = _grads(d) / 2
    assert (naive - big).norm() > 0.05 * big.norm()


def test_gradient_checkpointing_gives_the_same_gradient_and_refuses_models_without_it(
    tokenizer, teacher, student, examples
):
    """Recomputing the student's activations in backward changes memory, not the gradient."""
    cfg = make_cfg(loss="reverse_kl", loss_path="logits", max_new_tokens=8)
    plain = Distiller(copy.deepcopy(student).train(), tokenizer, teacher, examples, cfg)
    batch = _dataset_batch(plain, tokenizer, examples)
    plain.backward([batch])
    cfg.train.gradient_checkpointing = True
    ckpt = Distiller(copy.deepcopy(student).train(), tokenizer, teacher, examples, cfg)
    assert ckpt.student.is_gradient_checkpointing and not plain.student.is_gradient_checkpointing
    ckpt.backward([batch])
    assert _grads(plain).norm() > 0
    assert torch.allclose(_grads(ckpt), _grads(plain), atol=1e-6, rtol=1e-4)

    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ValueError, match="NoCheckpointing does not support it"):
        Distiller(NoCheckpointing(), tokenizer, teacher, examples, cfg)


def test_offline_cache_round_trips_exactly_and_matches_the_live_teacher(
    tmp_path, tokenizer, teacher, examples
):
    prompts, _ = encode_examples(tokenizer, examples)
    comp = tokenize_completions(tokenizer, [e.completion for e in examples])
    rollout = Rollout(prompts, prompts, comp, completion_mask(comp, 2))
    meta = {"teacher": "tiny", "k": 8, "temperature": 1.0, "vocab_size": len(tokenizer),
            "tokenizer": tokenizer_fingerprint(tokenizer)}  # fmt: skip
    cache = TeacherCache.empty(8, meta)
    scores, token_lp = score_for_cache(teacher, rollout, k=8, temperature=1.0, chunk_size=5)
    cache.append(rollout, scores, token_lp)
    path = cache.save(tmp_path / "cache.safetensors")
    loaded = TeacherCache.load(path)
    names = ("prompt_tokens", "prompt_offsets", "completion_tokens", "completion_offsets", "topk_logprobs")
    for name in (*names, "topk_indices", "token_logprobs"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name)), name
    assert loaded.meta == meta and len(loaded) == len(examples)

    # a batch of cached rows (other rows, other padding) equals the live teacher's scores on it
    rows = [4, 0, 2]
    batch, cached = loaded.batch(rows, pad_token_id=2)
    live = score_teacher(teacher, batch, "topk", k=8)
    assert torch.equal(cached.topk_indices, live.topk_indices)
    assert torch.allclose(cached.topk_logprobs, live.topk_logprobs, atol=1e-5)
    sampled = score_teacher(teacher, batch, "sampled")
    assert torch.allclose(cached.token_logprobs, sampled.token_logprobs, atol=1e-5)
    sub_prompts, _ = encode_examples(tokenizer, [examples[r] for r in rows])
    assert torch.equal(batch.student_prompts.ids, sub_prompts.ids)

    with pytest.raises(ValueError, match="teacher consistency.*k: cache has 8, run uses 16"):
        loaded.check_matches(teacher="tiny", k=16, temperature=1.0, vocab_size=len(tokenizer),
                             tokenizer_hash=meta["tokenizer"])  # fmt: skip
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(Exception):  # noqa: B017
        TeacherCache.load(tmp_path / "other.safetensors")


def test_offline_training_needs_no_teacher_and_learns(tokenizer, teacher, examples):
    from embodied_distill.lm.train import build_offline_cache

    cfg = make_cfg(steps=24, offline={"enabled": True, "source": "teacher"}, loss="generalized_jsd",
                   teacher_scoring="topk", k=16)  # fmt: skip
    student = layer_subset_student(teacher, [0])
    cache = build_offline_cache(teacher, student, tokenizer, examples, cfg, teacher_name="tiny", batch_size=4)
    before = _kl(student, teacher, tokenizer, examples)
    d = Distiller(student, tokenizer, None, examples, cfg, cache=cache)
    assert d.teacher is None
    for _ in range(24):
        d.step()
    assert _kl(student, teacher, tokenizer, examples) < 0.85 * before


def test_self_distillation_uses_the_student_with_privileged_context(tokenizer, student, examples):
    ex = [type(e)(e.messages, e.answer, e.completion, e.completion, e.kind) for e in examples]
    cfg = make_cfg(loss="reverse_kl", lmbda=1.0, self_distill=True)
    d = Distiller(student, tokenizer, None, ex, cfg)
    assert d.teacher is student
    rollout = d.make_rollout(ex[:2], "student")
    assert rollout.teacher_prompts.ids.shape[1] > rollout.student_prompts.ids.shape[1]
    text = tokenizer.decode(rollout.teacher_prompts.ids[0])
    assert "Reference answer" in text and ex[0].completion in text
    before = [p.detach().clone() for p in student.parameters()]
    d.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(ValueError, match="privileged 'context'"):
        Distiller(copy.deepcopy(student), tokenizer, None, examples, cfg).make_rollout(
            examples[:1], "student"
        )


def test_exopd_keeps_a_frozen_reference(tokenizer, teacher, student, examples):
    cfg = make_cfg(loss="sampled_reverse_kl", teacher_scoring="sampled", lmbda=1.0, exopd_lambda=1.5)
    d = Distiller(student, tokenizer, teacher, examples, cfg)
    ref = [p.detach().clone() for p in d.reference.parameters()]
    m = d.step()
    assert all(torch.equal(a, b) for a, b in zip(ref, d.reference.parameters())) and m["tokens"] > 0
