"""Chunked evaluation equals the unchunked loss (values and gradients) to 1e-5."""

import pytest
import torch

from embodied_distill import losses as L

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _logits(seed=0, shape=(3, 7, 33)):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 3).requires_grad_()
    t = torch.randn(shape, generator=g) * 3
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    return s, t, mask


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.3}),
    ("generalized_jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("total_variation", {}),
    ("topk_forward_kl", {"k": 5}),
    ("topk_reverse_kl", {"k": 5, "tail": "renorm"}),
    ("topk_jsd", {"k": 4, "beta": 0.6}),
]


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_equals_unchunked(name, kwargs, chunk_size):
    s, t, mask = _logits()
    want = L.CHUNKABLE[name](s, t, mask, temperature=1.3, **kwargs)
    got = L.chunked_divergence(s, t, mask, divergence=name, chunk_size=chunk_size, temperature=1.3, **kwargs)
    (g_want,) = torch.autograd.grad(want, s)
    (g_got,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(g_got, g_want, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_reductions_and_upstream_weights(reduction):
    s, t, mask = _logits(1)
    want = L.generalized_jsd(s, t, mask, beta=0.5, reduction=reduction)
    got = L.chunked_divergence(s, t, mask, chunk_size=5, beta=0.5, reduction=reduction)
    weights = torch.rand(want.shape) if reduction == "none" else torch.tensor(2.5)
    (g_want,) = torch.autograd.grad(want, s, grad_outputs=weights)
    (g_got,) = torch.autograd.grad(got, s, grad_outputs=weights)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(g_got, g_want, **TOL)


def test_chunked_accepts_a_callable_and_num_items():
    s, t, mask = _logits(2)

    def my_loss(s_, t_, m_, *, temperature, reduction):
        return L.reverse_kl(s_, t_, m_, temperature=temperature, reduction=reduction)

    want = L.reverse_kl(s, t, mask, num_items=100)
    got = L.chunked_divergence(s, t, mask, divergence=my_loss, chunk_size=3, num_items=100)
    torch.testing.assert_close(got, want, **TOL)


def _hidden(seed=0, n=(2, 9), h=8, ht=6, v=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*n, h, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_()
    hts = torch.randn(*n, ht, generator=g, dtype=dtype)
    wt = torch.randn(v, ht, generator=g, dtype=dtype) * 0.5
    bt = torch.randn(v, generator=g, dtype=dtype) * 0.1
    mask = torch.rand(n, generator=g) > 0.25
    return hs, w, b, hts, wt, bt, mask


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_hidden_state_variant_equals_naive(teacher, reduction, chunk_size):
    hs, w, b, hts, wt, bt, mask = _hidden()
    s_logits = hs @ w.t() + b
    t_logits = hts @ wt.t() + bt
    if teacher == "topk":
        cache = L.teacher_topk(t_logits, 7, temperature=1.2)
        want = L.precomputed_topk_divergence(
            s_logits,
            *cache,
            mask,
            divergence="generalized_jsd",
            beta=0.4,
            temperature=1.2,
            reduction=reduction,
        )
        src = {"teacher_topk": cache}
    else:
        want = L.generalized_jsd(s_logits, t_logits, mask, beta=0.4, temperature=1.2, reduction=reduction)
        src = (
            {"teacher_hidden": hts, "teacher_weight": wt, "teacher_bias": bt}
            if teacher == "hidden"
            else {"teacher_logits": t_logits}
        )
    got = L.chunked_divergence_from_hidden(
        hs, w, mask, student_bias=b, beta=0.4, temperature=1.2, reduction=reduction, chunk_size=chunk_size,
        divergence="generalized_jsd", **src,
    )  # fmt: skip
    g_want = torch.autograd.grad(want, (hs, w, b))
    g_got = torch.autograd.grad(got, (hs, w, b))
    torch.testing.assert_close(got, want, **TOL)
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, **TOL)


def test_hidden_state_variant_scales_with_upstream_gradient_and_num_items():
    hs, w, _, hts, wt, _, mask = _hidden(1)
    want = L.reverse_kl(hs @ w.t(), hts @ wt.t(), mask, num_items=50)
    got = L.chunked_divergence_from_hidden(
        hs,
        w,
        mask,
        teacher_hidden=hts,
        teacher_weight=wt,
        divergence="reverse_kl",
        num_items=50,
        chunk_size=5,
    )
    g_want = torch.autograd.grad(3.0 * want, (hs, w))
    g_got = torch.autograd.grad(3.0 * got, (hs, w))
    torch.testing.assert_close(got, want, **TOL)
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, **TOL)


def test_hidden_state_per_position_values_without_grad():
    hs, w, _, hts, wt, _, mask = _hidden(2)
    with torch.no_grad():
        got = L.chunked_divergence_from_hidden(
            hs, w, mask, teacher_hidden=hts, teacher_weight=wt, reduction="none", chunk_size=4
        )
    want = L.generalized_jsd(hs @ w.t(), hts @ wt.t(), mask, reduction="none")
    torch.testing.assert_close(got, want.detach(), **TOL)
    assert got.shape == mask.shape
    teacher = {"teacher_hidden": hts, "teacher_weight": wt, "chunk_size": 4}
    with torch.no_grad():  # scalar reductions without gradient take the plain evaluation path
        no_grad = L.chunked_divergence_from_hidden(hs, w, mask, **teacher)
    with_grad = L.chunked_divergence_from_hidden(hs, w, mask, **teacher)
    torch.testing.assert_close(no_grad, with_grad.detach(), **TOL)
    assert with_grad.requires_grad and not no_grad.requires_grad
    with pytest.raises(ValueError, match="reduction='none'"):
        L.chunked_divergence_from_hidden(hs, w, mask, teacher_hidden=hts, teacher_weight=wt, reduction="none")


def test_hidden_state_bad_arguments_raise():
    hs, w, _, hts, wt, _, mask = _hidden(3)
    with pytest.raises(ValueError, match="exactly one"):
        L.chunked_divergence_from_hidden(hs, w, mask)
    with pytest.raises(ValueError, match="exactly one"):
        L.chunked_divergence_from_hidden(
            hs, w, mask, teacher_hidden=hts, teacher_weight=wt, teacher_logits=hs
        )
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        L.chunked_divergence_from_hidden(hs, w, mask, teacher_hidden=hts, teacher_weight=wt[:-1])
    with pytest.raises(ValueError):
        L.chunked_divergence_from_hidden(hs, w.t(), mask, teacher_hidden=hts, teacher_weight=wt)
    with pytest.raises(ValueError):
        L.chunked_divergence(hs @ w.t(), hts @ wt.t(), chunk_size=0)


def test_chunked_gradcheck_float64():
    s, t, mask = _logits(4, shape=(2, 3, 5))
    s = s.detach().double().requires_grad_()
    t = t.double()
    assert torch.autograd.gradcheck(
        lambda x: L.chunked_divergence(x, t, mask, chunk_size=2, beta=0.3, reduction="none"), (s,)
    )
    # The hidden-state variant (with bias) is gradchecked in test_loss_properties.py.


def test_empty_and_all_masked():
    s = torch.randn(0, 4, 6, requires_grad=True)
    out = L.chunked_divergence(s, torch.randn(0, 4, 6))
    assert out.item() == 0.0
    hs, w, _, hts, wt, _, mask = _hidden(6)
    out = L.chunked_divergence_from_hidden(
        hs, w, torch.zeros_like(mask), teacher_hidden=hts, teacher_weight=wt, chunk_size=4
    )
    grads = torch.autograd.grad(out, (hs, w))
    assert out.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
