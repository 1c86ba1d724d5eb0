"""PPO clip against manual cases, GAE against a hand-unrolled loop."""

import math

import pytest
import torch

from embodied_distill import losses as L


def test_ppo_clip_manual_cases():
    clip = 0.2
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5, 0.9]
    advs = [2.0, 2.0, 2.0, -1.0, -1.0, -1.0]
    # -min(r A, clip(r) A):
    expected = [
        -1.1 * 2.0,  # inside the clip range
        -1.2 * 2.0,  # A > 0, r above 1 + eps: clipped
        -0.5 * 2.0,  # A > 0, r below 1 - eps: unclipped (min picks r A)
        1.5 * 1.0,  # A < 0, r above 1 + eps: unclipped (pessimistic)
        0.8 * 1.0,  # A < 0, r below 1 - eps: clipped
        0.9 * 1.0,  # inside
    ]
    old = torch.zeros(6)
    new = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    adv = torch.tensor(advs)
    per = L.ppo_clip_loss(new, old, adv, clip=clip, reduction="none")
    torch.testing.assert_close(per, torch.tensor(expected))
    (g,) = torch.autograd.grad(per.sum(), new)
    # Zero gradient exactly where the clipped branch is active (cases 2 and 5).
    assert g[1].item() == 0.0 and g[4].item() == 0.0
    for i in (0, 2, 3, 5):
        assert g[i].item() == pytest.approx(-ratios[i] * advs[i], rel=1e-6)
    mask = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(L.ppo_clip_loss(new, old, adv, mask, clip=clip), per[mask].mean())


def test_ppo_stats():
    new = torch.log(torch.tensor([1.0, 1.5, 0.9]))
    stats = L.ppo_stats(new, torch.zeros(3), clip=0.2)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    r = torch.tensor([1.0, 1.5, 0.9])
    assert stats["approx_kl"].item() == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-6)


def test_clipped_value_loss_manual():
    v = torch.tensor([1.5, 0.0, 1.05], requires_grad=True)
    old = torch.tensor([1.0, 1.0, 1.0])
    ret = torch.tensor([2.0, 2.0, 0.0])
    # V_clip = old + clip(v - old, 0.2) = (1.2, 0.8, 1.05)
    expected = 0.5 * torch.tensor([max(0.25, 0.64), max(4.0, 1.44), max(1.1025, 1.1025)])
    torch.testing.assert_close(L.clipped_value_loss(v, old, ret, clip=0.2, reduction="none"), expected)
    torch.testing.assert_close(
        L.clipped_value_loss(v, old, ret, clip=None, reduction="none"), 0.5 * (v - ret) ** 2
    )


def test_entropy_bonus_and_normalize_advantages():
    ent = torch.tensor([1.0, 2.0, 3.0])
    assert L.entropy_bonus(ent, coef=0.01).item() == pytest.approx(-0.02)
    adv = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = L.normalize_advantages(adv, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = (kept - kept.mean()) / (kept.std() + 1e-8)
    torch.testing.assert_close(out[mask], ref)
    assert out[~mask].abs().sum().item() == 0.0
    assert adv[0, 2].item() == 100.0  # input untouched
    torch.testing.assert_close(L.normalize_advantages(kept), ref)


def _gae_by_hand(rewards, values, dones, last_value, gamma, lam):
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            next_v = last_value[n] if t == T - 1 else values[t + 1][n]
            nonterminal = 1.0 - dones[t][n]
            delta = rewards[t][n] + gamma * next_v * nonterminal - values[t][n]
            running = delta + gamma * lam * nonterminal * running
            adv[t][n] = running
    return adv


def test_gae_against_hand_unrolled_loop():
    g = torch.Generator().manual_seed(0)
    T, N = 7, 3
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    dones = (torch.rand(T, N, generator=g) < 0.25).double()
    dones[2, 0] = dones[6, 1] = 1.0
    last = torch.randn(N, generator=g, dtype=torch.float64)
    adv, ret = L.compute_gae(rewards, values, dones, last, gamma=0.9, lam=0.8)
    ref = torch.tensor(
        _gae_by_hand(rewards.tolist(), values.tolist(), dones.tolist(), last.tolist(), 0.9, 0.8)
    )
    torch.testing.assert_close(adv, ref.double())
    torch.testing.assert_close(ret, ref.double() + values)


def test_gae_special_cases():
    rewards = torch.tensor([[1.0], [1.0], [1.0]])
    values = torch.zeros(3, 1)
    dones = torch.zeros(3, 1)
    # lambda = 1, V = 0: advantages are discounted returns (bootstrapped with last value 10).
    adv, _ = L.compute_gae(rewards, values, dones, torch.tensor([10.0]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(
        adv[:, 0], torch.tensor([1 + 0.5 + 0.25 + 0.125 * 10, 1 + 0.5 + 0.25 * 10, 1 + 5.0])
    )
    # A termination cuts both the bootstrap and the propagation.
    dones[1, 0] = 1.0
    adv, _ = L.compute_gae(rewards, values, dones, torch.tensor([10.0]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.5, 1.0, 6.0]))
    with pytest.raises(ValueError):
        L.compute_gae(rewards, values, dones, torch.tensor([1.0, 2.0]))
