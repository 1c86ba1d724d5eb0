import pytest
import torch

from embodied_distill.lm.models import check_compatible, layer_subset_student, tiny_chat_tokenizer, tiny_llama
from embodied_distill.lm.rollout import (
    Rollout,
    completion_mask,
    encode_examples,
    generate,
    sequence,
    strip_padding,
    tokenize_completions,
)
from embodied_distill.lm.scoring import (
    completion_outputs,
    flat_positions,
    linear_head,
    score_teacher,
    shared_prefix_length,
)
from embodied_distill.losses import teacher_topk, token_log_probs


def test_vocabulary_mismatch_fails_loudly_with_both_sizes(tokenizer, student):
    other = tiny_llama(len(tokenizer) + 7)
    with pytest.raises(ValueError, match=rf"student has {len(tokenizer)} .*teacher has {len(tokenizer) + 7}"):
        check_compatible(student, other)
    bigger_tok = tiny_chat_tokenizer(extra_tokens=3)
    with pytest.raises(
        ValueError, match=rf"{len(tokenizer)} tokens, teacher tokenizer has {len(tokenizer) + 3}"
    ):
        check_compatible(student, student, tokenizer, bigger_tok)


def test_vocabulary_mismatch_fails_in_the_trainer(tokenizer, student, examples):
    from lm_helpers import make_cfg

    from embodied_distill.lm.trainer import Distiller

    with pytest.raises(ValueError, match="vocabulary mismatch"):
        Distiller(student, tokenizer, tiny_llama(len(tokenizer) + 1), examples, make_cfg())


def test_layer_subset_student_copies_teacher_layers(tokenizer, teacher):
    full = layer_subset_student(teacher, [0, 1])
    ids = torch.randint(0, len(tokenizer), (2, 9))
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, teacher(ids).logits, atol=1e-5)
    one = layer_subset_student(teacher, [1])
    assert torch.equal(one.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    one.model.layers[0].mlp.up_proj.weight.data.add_(1.0)  # a copy: the teacher is untouched
    assert not torch.equal(one.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="distinct indices"):
        layer_subset_student(teacher, [0, 5])


def test_completion_mask_and_positions():
    comp = torch.tensor([[5, 6, 2, 2, 2], [7, 2, 9, 2, 2], [5, 6, 7, 8, 9]])
    mask = completion_mask(comp, 2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    c, m = strip_padding(comp[:2], mask[:2])
    assert c.shape[1] == 3 and m.all(1).tolist() == [True, False]


def test_forward_at_completion_positions_reproduces_generation_logprobs(tokenizer, teacher, examples):
    """Log-probs of the training forward pass (left padding, position ids) equal those seen while sampling."""
    prompts, _ = encode_examples(tokenizer, examples)
    torch.manual_seed(0)
    out = teacher.generate(
        input_ids=prompts.ids,
        attention_mask=prompts.mask,
        max_new_tokens=5,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        pad_token_id=2,
        eos_token_id=2,
        output_logits=True,
        return_dict_in_generate=True,
    )
    comp = out.sequences[:, prompts.ids.shape[1] :]
    mask = completion_mask(comp, 2)
    gen = torch.stack(out.logits, 1).log_softmax(-1)
    with torch.no_grad():
        fwd = completion_outputs(teacher, prompts, comp, mask, hidden=False).log_softmax(-1)
        hid = completion_outputs(teacher, prompts, comp, mask, hidden=True)
    assert torch.allclose(fwd[mask], gen[mask], atol=1e-4)
    w, b = linear_head(teacher)
    assert b is None and torch.allclose((hid @ w.T).log_softmax(-1)[mask], gen[mask], atol=1e-4)
    ids, attn, pos = sequence(prompts, comp, mask)
    assert ids.shape == attn.shape == pos.shape and int(pos[0, -1]) >= 0


def test_teacher_scoring_modes_agree(tokenizer, teacher, examples):
    prompts, _ = encode_examples(tokenizer, examples)
    comp = tokenize_completions(tokenizer, [e.completion for e in examples])
    mask = completion_mask(comp, 2)
    rollout = Rollout(prompts, prompts, comp, mask)
    full = score_teacher(teacher, rollout, "full")
    logits = full.logits_chunk(0, full.num_positions)
    assert logits.shape == (rollout.num_tokens, len(tokenizer))
    topk = score_teacher(teacher, rollout, "topk", k=5, temperature=0.7, chunk_size=4)
    lp, idx = teacher_topk(logits, 5, 0.7)
    assert torch.allclose(topk.topk_logprobs, lp, atol=1e-6) and torch.equal(topk.topk_indices, idx)
    sampled = score_teacher(teacher, rollout, "sampled", temperature=0.7, chunk_size=3)
    tokens = flat_positions(comp, mask)
    assert torch.allclose(sampled.token_logprobs, token_log_probs(logits, tokens, 0.7), atol=1e-6)
    with pytest.raises(ValueError, match="scoring mode"):
        score_teacher(teacher, rollout, "logits")


@pytest.mark.parametrize("head", ["linear", "logits"])
def test_teacher_prefix_cache_gives_the_same_scores(tokenizer, teacher, head):
    """The shared prompt prefix run once and its cache repeated over the batch: the same scores, for
    prompts of different lengths (left padding) and completions of different lengths."""
    from embodied_distill.lm.tasks import Example

    words = ["cat", "horse", "ox", "giraffe", "bee"]
    examples = [
        Example(({"role": "user", "content": f"plural of {w}?"},), completion=w + "s.") for w in words
    ]
    prompts, _ = encode_examples(tokenizer, examples)
    lengths = prompts.mask.sum(1)
    assert len(set(lengths.tolist())) > 2  # really left-padded
    n = shared_prefix_length(prompts)
    common = prompts.ids[0, prompts.ids.shape[1] - int(lengths[0]) :][:n]
    for row, length in zip(prompts.ids, lengths):  # n leading real tokens shared by every row, not n + 1
        assert torch.equal(row[len(row) - int(length) :][:n], common)
    assert len({int(row[len(row) - int(length) + n]) for row, length in zip(prompts.ids, lengths)}) > 1
    comp = tokenize_completions(tokenizer, [e.completion for e in examples])
    rollout = Rollout(prompts, prompts, comp, completion_mask(comp, 2))
    if head == "logits":  # a model whose logits are not a plain linear map: scored through its own forward
        teacher.config.logit_scale = 1.0001
        assert linear_head(teacher) is None
    for mode in ("full", "topk", "sampled"):
        plain = score_teacher(teacher, rollout, mode, k=5)
        cached = score_teacher(teacher, rollout, mode, k=5, prefix_cache=True)
        for name in ("hidden", "logits", "topk_logprobs", "token_logprobs"):
            a, b = getattr(plain, name), getattr(cached, name)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    # no shared prefix (one prompt, or prompts differing at the first token): the plain forward
    assert shared_prefix_length(encode_examples(tokenizer, examples[:1])[0]) == 0


def test_generate_is_plain_tempered_sampling(tokenizer, teacher, examples):
    prompts, _ = encode_examples(tokenizer, examples[:1])
    greedy = [
        generate(teacher, prompts, max_new_tokens=4, eos_token_id=2, pad_token_id=2, greedy=True)
        for _ in range(2)
    ]
    assert torch.equal(greedy[0], greedy[1])
    teacher.train()
    generate(teacher, prompts, max_new_tokens=2, eos_token_id=2, pad_token_id=2)
    assert teacher.training  # mode restored
