"""Top-k divergences: k = V equals the full loss; hand-computed buckets; offline caches."""

import math

import pytest
import torch

from embodied_distill import losses as L

FULL = {"topk_forward_kl": L.forward_kl, "topk_reverse_kl": L.reverse_kl, "topk_jsd": L.generalized_jsd}
TOPK = {"topk_forward_kl": L.topk_forward_kl, "topk_reverse_kl": L.topk_reverse_kl, "topk_jsd": L.topk_jsd}


def _pair(seed=0, shape=(2, 3, 9), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=dtype) * 2).requires_grad_()
    t = torch.randn(shape, generator=g, dtype=dtype) * 2
    return s, t


@pytest.mark.parametrize("name", sorted(TOPK))
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_k_equal_vocab_matches_full_loss_values_and_grads(name, tail):
    s, t = _pair()
    mask = torch.tensor([[True, False, True], [True, True, False]])
    kwargs = {"beta": 0.3} if name == "topk_jsd" else {}
    got = TOPK[name](s, t, mask, k=9, tail=tail, **kwargs)
    want = FULL[name](s, t, mask, **kwargs)
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_forward_bucket_by_hand():
    # Teacher (0.6, 0.3, 0.1), student (0.2, 0.5, 0.3); k = 1 keeps the teacher's argmax (token 0).
    p_t, p_s = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    t, s = torch.tensor(p_t).log(), torch.tensor(p_s).log()
    bucket = 0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8)
    assert L.topk_forward_kl(s, t, k=1, tail="bucket").item() == pytest.approx(bucket, rel=1e-6)
    # k = 2, renormalised over tokens {0, 1}: teacher (2/3, 1/3), student (2/7, 5/7).
    renorm = (2 / 3) * math.log((2 / 3) / (2 / 7)) + (1 / 3) * math.log((1 / 3) / (5 / 7))
    assert L.topk_forward_kl(s, t, k=2, tail="renorm").item() == pytest.approx(renorm, rel=1e-6)


def test_reverse_uses_student_topk_by_hand():
    p_t, p_s = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    t, s = torch.tensor(p_t).log(), torch.tensor(p_s).log()
    # Student's argmax is token 1: buckets student (0.5, 0.5), teacher (0.3, 0.7).
    expected = 0.5 * math.log(0.5 / 0.3) + 0.5 * math.log(0.5 / 0.7)
    assert L.topk_reverse_kl(s, t, k=1).item() == pytest.approx(expected, rel=1e-6)


def test_jsd_uses_union_support_by_hand():
    p_t, p_s = [0.6, 0.3, 0.05, 0.05], [0.2, 0.5, 0.2, 0.1]
    t, s = torch.tensor(p_t, dtype=torch.float64).log(), torch.tensor(p_s, dtype=torch.float64).log()
    # k = 1: union of {0} (teacher) and {1} (student) + tail bucket {2, 3}.
    bt, bs = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    beta = 0.4
    m = [beta * a + (1 - beta) * b for a, b in zip(bt, bs)]
    expected = beta * sum(a * math.log(a / c) for a, c in zip(bt, m)) + (1 - beta) * sum(
        b * math.log(b / c) for b, c in zip(bs, m)
    )
    assert L.topk_jsd(s, t, k=1, beta=beta).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", sorted(TOPK))
def test_bucket_never_exceeds_full_divergence(name):
    # Coarse-graining cannot increase an f-divergence (data-processing inequality).
    s, t = _pair(1, shape=(64, 20))
    kwargs = {"beta": 0.5} if name == "topk_jsd" else {}
    for k in (1, 3, 10):
        top = TOPK[name](s, t, k=k, reduction="none", **kwargs)
        full = FULL[name](s, t, reduction="none", **kwargs)
        assert (top <= full + 1e-12).all()


def test_teacher_topk_cache():
    _, t = _pair(2)
    values, indices = L.teacher_topk(t, 4, temperature=1.5)
    ref = torch.log_softmax(t / 1.5, -1).topk(4, -1)
    torch.testing.assert_close(values, ref.values)
    assert torch.equal(indices, ref.indices)
    assert not values.requires_grad


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_precomputed_cache_matches_live_teacher(tail, divergence):
    s, t = _pair(3)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    # k = V: no tail, equals the full divergence.
    lp, idx = L.teacher_topk(t, 9)
    full = L.get_divergence(divergence)(s, t, mask)
    got = L.precomputed_topk_divergence(s, lp, idx, mask, divergence=divergence, tail=tail)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-12)
    # k < V with the forward KL: identical support to topk_forward_kl, so identical values and grads.
    if divergence == "forward_kl":
        lp, idx = L.teacher_topk(t, 3)
        got = L.precomputed_topk_divergence(s, lp, idx, mask, tail=tail)
        want = L.topk_forward_kl(s, t, mask, k=3, tail=tail)
        (g_got,) = torch.autograd.grad(got, s)
        (g_want,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, g_want)


def test_precomputed_cache_with_float32_rounding_is_finite():
    torch.manual_seed(0)
    s = torch.randn(8, 50, requires_grad=True)
    t = torch.randn(8, 50) * 8  # very peaked teacher: cached mass ~ 1 - 1e-8
    lp, idx = L.teacher_topk(t, 10)
    out = L.precomputed_topk_divergence(s, lp, idx)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(g).all()


def test_bad_arguments_raise():
    s, t = _pair(4)
    with pytest.raises(ValueError):
        L.topk_forward_kl(s, t, k=0)
    with pytest.raises(ValueError):
        L.topk_forward_kl(s, t, k=10)
    with pytest.raises(ValueError):
        L.topk_jsd(s, t, k=2, tail="drop")
    lp, idx = L.teacher_topk(t, 3)
    with pytest.raises(ValueError):
        L.precomputed_topk_divergence(s[:1], lp, idx)
    with pytest.raises(ValueError):
        L.precomputed_topk_divergence(s, lp, idx[..., :2])
