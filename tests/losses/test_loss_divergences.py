"""Categorical divergences against closed forms computed independently (by hand and with numpy)."""

import math

import numpy as np
import pytest
import torch

from embodied_distill import losses as L

# ---------------------------------------------------------------------------------------------------
# Independent numpy references (probabilities in, per-distribution value out).
# ---------------------------------------------------------------------------------------------------


def np_kl(p, q):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(np.sum(p * (np.log(p) - np.log(q))))


def np_jsd(p_s, p_t, beta):
    m = beta * np.asarray(p_t) + (1 - beta) * np.asarray(p_s)  # mixture of *probabilities*
    return beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def logits_of(p):
    return torch.tensor(np.log(p), dtype=torch.float64)


# Two-point distributions: student (0.5, 0.5), teacher (0.8, 0.2).
S2 = logits_of([0.5, 0.5])
T2 = logits_of([0.8, 0.2])


def test_two_point_forward_kl_by_hand():
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert L.forward_kl(S2, T2).item() == pytest.approx(expected, abs=1e-12)


def test_two_point_reverse_kl_by_hand():
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert L.reverse_kl(S2, T2).item() == pytest.approx(expected, abs=1e-12)


def test_two_point_jsd_by_hand():
    beta = 0.3
    m = (beta * 0.8 + 0.7 * 0.5, beta * 0.2 + 0.7 * 0.5)
    kl_tm = 0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])
    kl_sm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    expected = beta * kl_tm + (1 - beta) * kl_sm
    assert L.generalized_jsd(S2, T2, beta=beta).item() == pytest.approx(expected, abs=1e-12)


def test_two_point_total_variation_by_hand():
    assert L.total_variation(S2, T2).item() == pytest.approx(0.3, abs=1e-12)


def test_two_point_skew_kls_by_hand():
    a = 0.1
    mix_f = (a * 0.8 + 0.9 * 0.5, a * 0.2 + 0.9 * 0.5)
    skl = 0.8 * math.log(0.8 / mix_f[0]) + 0.2 * math.log(0.2 / mix_f[1])
    assert L.skew_forward_kl(S2, T2, alpha=a).item() == pytest.approx(skl, abs=1e-12)
    mix_r = (a * 0.5 + 0.9 * 0.8, a * 0.5 + 0.9 * 0.2)
    srkl = 0.5 * math.log(0.5 / mix_r[0]) + 0.5 * math.log(0.5 / mix_r[1])
    assert L.skew_reverse_kl(S2, T2, alpha=a).item() == pytest.approx(srkl, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_categorical_against_numpy(seed):
    rng = np.random.default_rng(seed)
    zs, zt = rng.normal(size=(4, 7)) * 2, rng.normal(size=(4, 7)) * 2
    s, t = torch.tensor(zs), torch.tensor(zt)
    ps, pt = [np_softmax(z) for z in zs], [np_softmax(z) for z in zt]
    cases = {
        "forward": (L.forward_kl(s, t, reduction="none"), [np_kl(b, a) for a, b in zip(ps, pt)]),
        "reverse": (L.reverse_kl(s, t, reduction="none"), [np_kl(a, b) for a, b in zip(ps, pt)]),
        "jsd": (
            L.generalized_jsd(s, t, beta=0.7, reduction="none"),
            [np_jsd(a, b, 0.7) for a, b in zip(ps, pt)],
        ),
        "tv": (
            L.total_variation(s, t, reduction="none"),
            [0.5 * np.abs(a - b).sum() for a, b in zip(ps, pt)],
        ),
        "skew_f": (
            L.skew_forward_kl(s, t, alpha=0.25, reduction="none"),
            [np_kl(b, 0.25 * b + 0.75 * a) for a, b in zip(ps, pt)],
        ),
        "skew_r": (
            L.skew_reverse_kl(s, t, alpha=0.25, reduction="none"),
            [np_kl(a, 0.25 * a + 0.75 * b) for a, b in zip(ps, pt)],
        ),
    }
    for name, (got, expected) in cases.items():
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12, err_msg=name)


def test_temperature_divides_both_sides():
    rng = np.random.default_rng(3)
    s, t = torch.tensor(rng.normal(size=(3, 6))), torch.tensor(rng.normal(size=(3, 6)))
    for fn in (L.forward_kl, L.reverse_kl, L.generalized_jsd, L.total_variation):
        torch.testing.assert_close(fn(s, t, temperature=2.5), fn(s / 2.5, t / 2.5), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        L.forward_kl(s, t, temperature=0.0)


@pytest.mark.parametrize(
    "fn",
    [
        L.forward_kl,
        L.reverse_kl,
        L.generalized_jsd,
        L.skew_forward_kl,
        L.skew_reverse_kl,
        L.total_variation,
    ],
)
def test_identical_inputs_give_zero(fn):
    z = torch.randn(3, 4, 11, dtype=torch.float64) * 3
    assert fn(z, z.clone(), reduction="none").abs().max().item() < 1e-12


def test_jsd_endpoints_are_exactly_the_two_kls():
    torch.manual_seed(0)
    s, t = torch.randn(5, 9) * 2, torch.randn(5, 9) * 2
    for reduction in ("none", "mean"):
        torch.testing.assert_close(
            L.generalized_jsd(s, t, beta=0.0, reduction=reduction),
            L.forward_kl(s, t, reduction=reduction),
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close(
            L.generalized_jsd(s, t, beta=1.0, reduction=reduction),
            L.reverse_kl(s, t, reduction=reduction),
            rtol=0,
            atol=1e-6,
        )
    # Near (but not at) the ends the mixture formula tends to 0, as documented: beta * KL(T||S) at 0,
    # (1 - beta) * KL(S||T) at 1; so the endpoints must be special-cased, not clamped.
    eps = 1e-6
    s64, t64 = s.double(), t.double()
    near0 = L.generalized_jsd(s64, t64, beta=eps, reduction="none") / eps
    near1 = L.generalized_jsd(s64, t64, beta=1 - eps, reduction="none") / eps
    torch.testing.assert_close(near0, L.forward_kl(s64, t64, reduction="none"), rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(near1, L.reverse_kl(s64, t64, reduction="none"), rtol=1e-3, atol=1e-8)
    assert (L.generalized_jsd(s64, t64, beta=eps, reduction="none") < 1e-4).all()


def test_jsd_beta_symmetry():
    torch.manual_seed(1)
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=0.2), L.generalized_jsd(t, s, beta=0.8))


def test_beta_and_alpha_out_of_range_raise():
    s = torch.randn(2, 3)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError):
            L.generalized_jsd(s, s, beta=bad)
        with pytest.raises(ValueError):
            L.skew_forward_kl(s, s, alpha=bad)


def test_gradients_match_closed_forms():
    torch.manual_seed(2)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    p_s, p_t = torch.softmax(s.detach(), -1), torch.softmax(t, -1)
    # d KL(T||S) / d z_S = p_S - p_T
    (g,) = torch.autograd.grad(L.forward_kl(s, t, reduction="sum"), s)
    torch.testing.assert_close(g, p_s - p_t)
    # d KL(S||T) / d z_S = p_S * (log p_S - log p_T - KL(S||T))
    (g,) = torch.autograd.grad(L.reverse_kl(s, t, reduction="sum"), s)
    log_ratio = p_s.log() - p_t.log()
    kl = (p_s * log_ratio).sum(-1, keepdim=True)
    torch.testing.assert_close(g, p_s * (log_ratio - kl))


def test_teacher_receives_no_gradient():
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4, requires_grad=True)
    for fn in L.DIVERGENCES.values():
        out = fn(s, t)
        (gt,) = torch.autograd.grad(out, t, allow_unused=True)
        assert gt is None


def test_mask_selects_positions():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per = L.reverse_kl(s, t, reduction="none")
    torch.testing.assert_close(L.reverse_kl(s, t, mask), per[mask].mean())
    torch.testing.assert_close(L.reverse_kl(s, t, mask, reduction="sum"), per[mask].sum())


def test_extreme_logits_are_finite():
    torch.manual_seed(4)
    s = (torch.randn(4, 8) * 1e4).requires_grad_()
    t = torch.randn(4, 8) * 1e4
    for fn in L.DIVERGENCES.values():
        out = fn(s, t)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all(), fn.__name__


def test_minus_inf_logits_on_both_sides_are_ignored():
    s = torch.tensor([[0.3, -math.inf, 1.0, -0.5]], requires_grad=True)
    t = torch.tensor([[1.0, -math.inf, -0.2, 0.4]])
    keep = [0, 2, 3]
    for fn in L.DIVERGENCES.values():
        out = fn(s, t)
        (g,) = torch.autograd.grad(out, s)
        ref = fn(s.detach()[:, keep], t[:, keep])
        assert torch.isfinite(out) and torch.isfinite(g).all(), fn.__name__
        torch.testing.assert_close(out, ref, msg=fn.__name__)
        assert g[0, 1].item() == 0.0


def test_vocab_mismatch_fails_loudly():
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        L.forward_kl(torch.randn(1, 151936), torch.randn(1, 152064))  # Qwen2.5 0.5B vs 7B heads
    with pytest.raises(ValueError):
        L.generalized_jsd(torch.randn(2, 5), torch.randn(3, 5))


def test_half_precision_is_upcast():
    torch.manual_seed(5)
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    out = L.generalized_jsd(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    ref = L.generalized_jsd(s.bfloat16().double(), t.bfloat16().double())
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_get_divergence_lists_valid_names():
    assert L.get_divergence("reverse_kl") is L.reverse_kl
    with pytest.raises(ValueError, match="forward_kl"):
        L.get_divergence("kl")
