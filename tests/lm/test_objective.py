"""The routing to the loss core: every path gives the core's value and gradient; sampled-token and
full-distribution reverse KL agree in expectation; TIP selects the requested fraction."""

import pytest
import torch
import torch.nn.functional as F

from embodied_distill.lm.objective import FULL_LOSSES, LossSpec, StudentRows, distill_loss, tip_mask
from embodied_distill.lm.rollout import Prompts, Rollout, generate
from embodied_distill.lm.scoring import TeacherScores, completion_outputs, flat_positions, score_teacher
from embodied_distill.losses import generalized_jsd, reverse_kl, teacher_topk, token_log_probs

V, H, N = 40, 8, 13


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g).mul_(0.7).requires_grad_()
    t_hidden, t_weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    tokens = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, t_hidden, t_weight, tokens


@pytest.mark.parametrize("loss", FULL_LOSSES)
def test_all_paths_give_the_core_value_and_gradient(loss):
    hidden, weight, t_hidden, t_weight, tokens = _rows()
    results = []
    for path in ("hidden", "chunked", "logits"):
        spec = LossSpec(loss=loss, k=7, loss_path=path, chunk_size=5, temperature=0.8, beta=0.3)
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        student = StudentRows(tokens=tokens, hidden=h, weight=w)
        value, _ = distill_loss(
            spec, student, TeacherScores(hidden=t_hidden, weight=t_weight), num_items=N, taid_t=0.6
        )
        value.backward()
        results.append((value.detach(), h.grad, w.grad))
    for value, gh, gw in results[1:]:
        assert torch.allclose(value, results[0][0], atol=1e-5)
        assert torch.allclose(gh, results[0][1], atol=1e-5) and torch.allclose(gw, results[0][2], atol=1e-5)
    if loss == "generalized_jsd":  # and it is the core's generalized_jsd on the logits
        direct = generalized_jsd(hidden @ weight.T, t_hidden @ t_weight.T, beta=0.3, temperature=0.8)
        assert torch.allclose(results[0][0], direct, atol=1e-5)


def test_num_items_divides_the_token_sum():
    hidden, weight, t_hidden, t_weight, tokens = _rows()
    spec = LossSpec(loss="reverse_kl")
    student = StudentRows(tokens=tokens, hidden=hidden, weight=weight)
    teacher = TeacherScores(hidden=t_hidden, weight=t_weight)
    mean, _ = distill_loss(spec, student, teacher, num_items=N)
    scaled, _ = distill_loss(spec, student, teacher, num_items=4 * N)
    assert torch.allclose(scaled * 4, mean, atol=1e-6)
    assert torch.allclose(mean, reverse_kl(hidden @ weight.T, t_hidden @ t_weight.T), atol=1e-5)


def test_topk_teacher_scores_with_k_equal_vocab_give_the_full_loss():
    hidden, weight, t_hidden, t_weight, tokens = _rows()
    lp, idx = teacher_topk(t_hidden @ t_weight.T, V)
    for path in ("hidden", "logits"):
        spec = LossSpec(loss="generalized_jsd", beta=0.5, loss_path=path)
        cached, _ = distill_loss(
            spec,
            StudentRows(tokens=tokens, hidden=hidden, weight=weight),
            TeacherScores(topk_logprobs=lp, topk_indices=idx),
            num_items=N,
        )
        full = generalized_jsd(hidden @ weight.T, t_hidden @ t_weight.T, beta=0.5)
        assert torch.allclose(cached, full, atol=1e-5)
    with pytest.raises(ValueError, match="needs full teacher logits"):
        distill_loss(
            LossSpec(loss="topk_jsd"),
            StudentRows(tokens=tokens, hidden=hidden, weight=weight),
            TeacherScores(topk_logprobs=lp, topk_indices=idx),
            num_items=N,
        )


def test_sampled_and_full_reverse_kl_agree_in_expectation(teacher, student):
    """On the student's own rollouts, the sampled-token estimator (value: k1/k3; gradient: score-function
    surrogate) matches the full-vocabulary reverse KL in expectation, through the real rollout code."""
    prompts = Prompts(torch.tensor([[17, 45, 62]]).repeat(8000, 1), torch.ones(8000, 3, dtype=torch.long))
    torch.manual_seed(0)
    completion = generate(student, prompts, max_new_tokens=2, eos_token_id=2, pad_token_id=2)
    mask = torch.ones_like(completion, dtype=torch.bool)  # score both positions of every rollout
    rollout = Rollout(prompts, prompts, completion, mask)
    params = [p for p in student.parameters() if p.requires_grad]

    def grad_of(spec, scores):
        student.zero_grad()
        hidden = flat_positions(completion_outputs(student, prompts, completion, mask, hidden=True), mask)
        rows = StudentRows(
            tokens=flat_positions(completion, mask), hidden=hidden, weight=student.lm_head.weight
        )
        loss, stats = distill_loss(spec, rows, scores, num_items=rollout.num_tokens)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params]).clone(), loss.detach(), stats

    g_full, kl_full, _ = grad_of(LossSpec(loss="reverse_kl"), score_teacher(teacher, rollout, "full"))
    sampled = score_teacher(teacher, rollout, "sampled")
    g_samp, _, stats = grad_of(LossSpec(loss="sampled_reverse_kl"), sampled)
    with torch.no_grad():  # value estimators: within 4 standard errors of the full reverse KL
        hidden = flat_positions(completion_outputs(student, prompts, completion, mask, hidden=True), mask)
        log_s = token_log_probs(hidden @ student.lm_head.weight.T, flat_positions(completion, mask))
        log_r = sampled.token_logprobs - log_s
        for name, values in (("kl_k1", -log_r), ("kl_k3", torch.expm1(log_r) - log_r)):
            assert abs(stats[name] - values.mean()) < 1e-4
            stderr = values.std() / values.numel() ** 0.5
            assert abs(values.mean() - kl_full) < 4 * stderr, (name, float(values.mean()), float(kl_full))
    cosine = F.cosine_similarity(g_full, g_samp, dim=0)
    projection = (g_samp @ g_full) / (g_full @ g_full)  # 1 for an unbiased estimate (noise is orthogonal)
    assert cosine > 0.9, float(cosine)
    assert abs(projection - 1) < 0.1, float(projection)


def test_exopd_with_lambda_one_equals_opd_and_extrapolates_otherwise():
    hidden, weight, _, _, tokens = _rows()
    logits = torch.randn(N, V)
    t_lp = token_log_probs(logits, tokens)
    ref = token_log_probs(hidden.detach() @ weight.detach().T, tokens) - 0.3
    grads = {}
    for lam in (1.0, 1.0001, 2.0):
        h = hidden.detach().clone().requires_grad_()
        rows = StudentRows(tokens=tokens, hidden=h, weight=weight.detach())
        loss, _ = distill_loss(
            LossSpec(loss="sampled_reverse_kl", exopd_lambda=lam),
            rows,
            TeacherScores(token_logprobs=t_lp),
            num_items=N,
            ref_logprobs=ref,
        )
        loss.backward()
        grads[lam] = h.grad
    assert torch.allclose(grads[1.0], grads[1.0001], atol=1e-3)  # surrogate == ExOPD at lambda = 1
    assert not torch.allclose(grads[1.0], grads[2.0], atol=1e-3)


@pytest.mark.parametrize("rule", ["entropy", "divergence", "overconfident", "combined"])
def test_tip_mask_keeps_the_requested_fraction(rule):
    hidden, weight, t_hidden, t_weight, tokens = _rows()
    keep = tip_mask(
        LossSpec(loss="reverse_kl", chunk_size=4),
        StudentRows(tokens=tokens, hidden=hidden, weight=weight),
        TeacherScores(hidden=t_hidden, weight=t_weight),
        keep_fraction=0.5,
        rule=rule,
    )
    assert keep.dtype == torch.bool and keep.shape == (N,)
    assert 1 <= int(keep.sum()) <= 7
    if rule == "entropy":
        entropy = -(
            torch.log_softmax(hidden @ weight.T, -1).exp() * torch.log_softmax(hidden @ weight.T, -1)
        ).sum(-1)
        assert entropy[keep].min() >= entropy[~keep].max()


def test_lm_defines_no_loss_of_its_own():
    """Every divergence comes from embodied_distill.losses: no log-softmax / KL arithmetic in lm/."""
    from pathlib import Path

    import embodied_distill.lm as lm

    for path in Path(lm.__file__).parent.glob("*.py"):
        text = path.read_text()
        for needle in ("log_softmax", "kl_div", "logsumexp", "logaddexp"):
            assert needle not in text, f"{path.name} computes {needle} itself; use the loss core"
