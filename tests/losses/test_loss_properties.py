"""Properties every loss must have: gradcheck in float64, all-masked -> finite 0 with zero gradients,
finite on extreme inputs, inputs never mutated.

Each case builds ``(fn, grad_inputs, const_inputs)`` for a mask; ``fn(*grad_inputs)`` is the loss.
"""

from collections.abc import Callable

import pytest
import torch

from embodied_distill import losses as L

B, T, V, DA = 2, 3, 5, 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logit_case(loss: Callable, needs_mask: bool = True):
    def build(mask, dtype=torch.float64, scale=1.0):
        g = _gen(0)
        s = (torch.randn(B, T, V, generator=g, dtype=dtype) * 2 * scale).requires_grad_()
        t = torch.randn(B, T, V, generator=g, dtype=dtype) * 2 * scale
        return (lambda s_: loss(s_, t, mask)), [s], [t]

    return build


def _token_case(loss: Callable):
    def build(mask, dtype=torch.float64, scale=1.0):
        g = _gen(1)
        ls = (-torch.rand(B, T, generator=g, dtype=dtype) * 3 * scale).requires_grad_()
        lt = -torch.rand(B, T, generator=g, dtype=dtype) * 3 * scale
        return (lambda a: loss(a, lt, mask)), [ls], [lt]

    return build


def _gaussian_kl_case(mask, dtype=torch.float64, scale=1.0):
    g = _gen(2)
    tensors = [torch.randn(B, T, DA, generator=g, dtype=dtype) * scale for _ in range(4)]
    tensors[1] = tensors[1].clamp(-3, 3) * 0.3
    tensors[3] = tensors[3].clamp(-3, 3) * 0.3
    grads = [x.requires_grad_() for x in tensors]
    return (lambda a, b, c, d: L.gaussian_kl(a, b, c, d, mask)), grads, []


def _pair_case(loss: Callable, positive_second: bool = False):
    def build(mask, dtype=torch.float64, scale=1.0):
        g = _gen(3)
        a = (torch.randn(B, T, DA, generator=g, dtype=dtype) * scale).requires_grad_()
        b = torch.randn(B, T, DA, generator=g, dtype=dtype) * scale
        return (lambda x: loss(x, b, mask)), [a], [b]

    return build


def _nll_case(mask, dtype=torch.float64, scale=1.0):
    g = _gen(4)
    act = torch.randn(B, T, DA, generator=g, dtype=dtype) * scale
    mu = (torch.randn(B, T, DA, generator=g, dtype=dtype) * scale).requires_grad_()
    ls = (torch.randn(B, T, DA, generator=g, dtype=dtype) * 0.3).requires_grad_()
    return (lambda m, s: L.gaussian_nll(act, m, s, mask)), [mu, ls], [act]


def _ppo_case(mask, dtype=torch.float64, scale=1.0):
    g = _gen(5)
    new = (torch.randn(B, T, generator=g, dtype=dtype) * 0.3).requires_grad_()
    old = torch.randn(B, T, generator=g, dtype=dtype) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=dtype) * scale
    return (lambda x: L.ppo_clip_loss(x, old, adv, mask, clip=0.2)), [new], [old, adv]


def _value_case(mask, dtype=torch.float64, scale=1.0):
    g = _gen(6)
    v = (torch.randn(B, T, generator=g, dtype=dtype) * scale).requires_grad_()
    old = torch.randn(B, T, generator=g, dtype=dtype) * scale
    ret = torch.randn(B, T, generator=g, dtype=dtype) * scale
    return (lambda x: L.clipped_value_loss(x, old, ret, mask, clip=0.2)), [v], [old, ret]


def _entropy_case(mask, dtype=torch.float64, scale=1.0):
    e = (torch.rand(B, T, generator=_gen(7), dtype=dtype) * scale).requires_grad_()
    return (lambda x: L.entropy_bonus(x, mask, coef=0.01)), [e], []


def _denoise_case(prediction_type):
    def build(mask, dtype=torch.float64, scale=1.0):
        g = _gen(8)
        abar = torch.linspace(0.999, 0.01, 50, dtype=dtype)
        out = (torch.randn(B, T, DA, generator=g, dtype=dtype) * scale).requires_grad_()
        noise = torch.randn(B, T, DA, generator=g, dtype=dtype)
        x0 = torch.randn(B, T, DA, generator=g, dtype=dtype) * scale
        t = torch.tensor([3, 40])
        return (
            (lambda o: L.denoising_loss(o, noise, x0, t, abar, prediction_type, mask)),
            [out],
            [noise, x0, t, abar],
        )

    return build


def _hidden_case(mask, dtype=torch.float64, scale=1.0):
    g = _gen(9)
    h = (torch.randn(B, T, 3, generator=g, dtype=dtype) * scale).requires_grad_()
    w = torch.randn(V, 3, generator=g, dtype=dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_()
    ht = torch.randn(B, T, 4, generator=g, dtype=dtype) * scale
    wt = torch.randn(V, 4, generator=g, dtype=dtype)
    bt = torch.randn(V, generator=g, dtype=dtype) * 0.1

    def fn(a, c, d):
        return L.chunked_divergence_from_hidden(
            a, c, mask, student_bias=d, teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt, chunk_size=2
        )

    return fn, [h, w, b], [ht, wt, bt]


CASES = {
    "forward_kl": _logit_case(lambda s, t, m: L.forward_kl(s, t, m)),
    "reverse_kl": _logit_case(lambda s, t, m: L.reverse_kl(s, t, m)),
    "generalized_jsd_0.5": _logit_case(lambda s, t, m: L.generalized_jsd(s, t, m, beta=0.5, temperature=1.7)),
    "generalized_jsd_0": _logit_case(lambda s, t, m: L.generalized_jsd(s, t, m, beta=0.0)),
    "generalized_jsd_1": _logit_case(lambda s, t, m: L.generalized_jsd(s, t, m, beta=1.0)),
    "skew_forward_kl": _logit_case(lambda s, t, m: L.skew_forward_kl(s, t, m, alpha=0.1)),
    "skew_reverse_kl": _logit_case(lambda s, t, m: L.skew_reverse_kl(s, t, m, alpha=0.1)),
    "total_variation": _logit_case(lambda s, t, m: L.total_variation(s, t, m)),
    "topk_forward_kl_bucket": _logit_case(lambda s, t, m: L.topk_forward_kl(s, t, m, k=2)),
    "topk_forward_kl_renorm": _logit_case(lambda s, t, m: L.topk_forward_kl(s, t, m, k=2, tail="renorm")),
    "topk_reverse_kl_bucket": _logit_case(lambda s, t, m: L.topk_reverse_kl(s, t, m, k=2)),
    "topk_reverse_kl_renorm": _logit_case(lambda s, t, m: L.topk_reverse_kl(s, t, m, k=2, tail="renorm")),
    "topk_jsd_bucket": _logit_case(lambda s, t, m: L.topk_jsd(s, t, m, k=2, beta=0.4)),
    "topk_jsd_renorm": _logit_case(lambda s, t, m: L.topk_jsd(s, t, m, k=2, beta=0.4, tail="renorm")),
    "precomputed_topk_bucket": _logit_case(
        lambda s, t, m: L.precomputed_topk_divergence(s, *L.teacher_topk(t, 3), m)
    ),
    "precomputed_topk_jsd_renorm": _logit_case(
        lambda s, t, m: L.precomputed_topk_divergence(
            s, *L.teacher_topk(t, 3), m, divergence="generalized_jsd", tail="renorm"
        )
    ),
    "chunked_jsd": _logit_case(lambda s, t, m: L.chunked_divergence(s, t, m, chunk_size=2, beta=0.3)),
    "chunked_from_hidden": _hidden_case,
    "taid_loss": _logit_case(lambda s, t, m: L.taid_loss(s, t, m, t=0.6)),
    "sampled_kl_from_logits": _logit_case(
        lambda s, t, m: L.sampled_kl(s, t, torch.arange(B * T).reshape(B, T) % V, m, estimator="k3")
    ),
    "sampled_kl_k1": _token_case(lambda a, b, m: L.sampled_kl_k1(a, b, m)),
    "sampled_kl_k3": _token_case(lambda a, b, m: L.sampled_kl_k3(a, b, m)),
    "sampled_reverse_kl_surrogate": _token_case(lambda a, b, m: L.sampled_reverse_kl_surrogate(a, b, m)),
    "gaussian_kl": _gaussian_kl_case,
    "gaussian_nll": _nll_case,
    "masked_mse": _pair_case(lambda a, b, m: L.masked_mse(a, b, m)),
    "masked_l1": _pair_case(lambda a, b, m: L.masked_l1(a, b, m)),
    "consistency_loss_mse": _pair_case(lambda a, b, m: L.consistency_loss(a, b, m)),
    "consistency_loss_huber": _pair_case(
        lambda a, b, m: L.consistency_loss(a, b, m, loss_type="huber", huber_c=0.1)
    ),
    "ppo_clip_loss": _ppo_case,
    "clipped_value_loss": _value_case,
    "entropy_bonus": _entropy_case,
    "denoising_epsilon": _denoise_case("epsilon"),
    "denoising_sample": _denoise_case("sample"),
    "denoising_v_prediction": _denoise_case("v_prediction"),
}


def _random_mask():
    return torch.tensor([[True, False, True], [True, True, False]])


# Losses with a deliberate stop-gradient inside: their gradient is, by design, not the derivative of
# their value. Each maps the evaluation point to the function whose derivative the gradient must equal
# (the stop-gradient branch frozen at that point); gradcheck runs on it and the gradients must agree.
def _frozen_surrogate(mask):
    _, (ls,), (lt,) = CASES["sampled_reverse_kl_surrogate"](mask)
    coef = ls.detach() - lt
    return lambda a: L.masked_reduce(coef * a, mask)


def _frozen_taid(mask):
    _, (s,), (t,) = CASES["taid_loss"](mask)
    target = L.taid_target_log_probs(s, t, 0.6)
    return lambda x: L.masked_reduce((target.exp() * (target - torch.log_softmax(x, -1))).sum(-1), mask)


STOP_GRADIENT = {"sampled_reverse_kl_surrogate": _frozen_surrogate, "taid_loss": _frozen_taid}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_float64(name):
    mask = _random_mask()
    fn, grad_inputs, _ = CASES[name](mask)
    if name not in STOP_GRADIENT:
        assert torch.autograd.gradcheck(fn, tuple(grad_inputs), eps=1e-6, atol=1e-5, rtol=1e-4)
        return
    frozen = STOP_GRADIENT[name](mask)
    assert torch.autograd.gradcheck(frozen, tuple(grad_inputs), eps=1e-6, atol=1e-5, rtol=1e-4)
    got = torch.autograd.grad(fn(*grad_inputs), grad_inputs)
    want = torch.autograd.grad(frozen(*grad_inputs), grad_inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # ... and the plain gradcheck must fail for them (the stop-gradient is real).
    assert not torch.autograd.gradcheck(
        fn, tuple(grad_inputs), eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=False
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_masked_gives_finite_zero_and_zero_gradients(name):
    mask = torch.zeros(B, T, dtype=torch.bool)
    fn, grad_inputs, _ = CASES[name](mask)
    out = fn(*grad_inputs)
    grads = torch.autograd.grad(out, grad_inputs, allow_unused=True)
    assert out.item() == 0.0
    for g in grads:
        assert g is None or (torch.isfinite(g).all() and g.abs().max().item() == 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_extreme_inputs_are_finite(name):
    fn, grad_inputs, _ = CASES[name](_random_mask(), dtype=torch.float32, scale=5e3)  # logits ~ +-1e4
    out = fn(*grad_inputs)
    grads = torch.autograd.grad(out, grad_inputs, allow_unused=True)
    assert torch.isfinite(out).all(), out
    for g in grads:
        assert g is None or torch.isfinite(g).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_inputs_are_never_mutated(name):
    mask = _random_mask()
    fn, grad_inputs, const_inputs = CASES[name](mask)
    before = [x.detach().clone() for x in (*grad_inputs, *const_inputs, mask)]
    out = fn(*grad_inputs)
    torch.autograd.grad(out, grad_inputs, allow_unused=True)
    after = [x.detach() for x in (*grad_inputs, *const_inputs, mask)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_every_public_loss_is_covered():
    covered = " ".join(CASES)
    losses = [
        "forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl",
        "total_variation", "topk_forward_kl", "topk_reverse_kl", "topk_jsd", "precomputed_topk", "chunked",
        "taid_loss",
        "sampled_kl_k1", "sampled_kl_k3", "sampled_reverse_kl_surrogate", "gaussian_kl", "gaussian_nll",
        "masked_mse", "masked_l1", "consistency_loss", "ppo_clip_loss", "clipped_value_loss", "entropy_bonus",
        "denoising",
    ]  # fmt: skip
    assert [name for name in losses if name not in covered] == []
