"""Diffusion losses, DDIM step, LCM boundary scalings, consistency loss and EMA."""

import math

import pytest
import torch

from embodied_distill import losses as L


def _schedule(n=100):
    # squaredcos_cap_v2 ("cosine") schedule, as Diffusion Policy uses, built independently here.
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


ABAR = _schedule()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 6, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 99])
    return x0, eps, t


def test_add_noise_by_hand():
    x0, eps, t = _batch()
    xt = L.add_noise(x0, eps, t, ABAR)
    for i in range(4):
        a = ABAR[t[i]]
        torch.testing.assert_close(xt[i], a.sqrt() * x0[i] + (1 - a).sqrt() * eps[i])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_denoising_loss_zero_at_exact_target_and_predict_x0_roundtrip(prediction_type):
    x0, eps, t = _batch(1)
    xt = L.add_noise(x0, eps, t, ABAR)
    target = L.diffusion_target(x0, eps, t, ABAR, prediction_type)
    assert L.denoising_loss(target, eps, x0, t, ABAR, prediction_type).item() < 1e-24
    x0_hat, eps_hat = L.predict_x0(target, xt, t, ABAR, prediction_type)
    torch.testing.assert_close(x0_hat, x0)
    if prediction_type != "sample":  # eps is unrecoverable from x0 at alpha_bar ~ 1 only for 'sample'
        torch.testing.assert_close(eps_hat, eps)
    # A perturbed prediction gives the MSE of the perturbation, masked per step.
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :3] = True
    out = L.denoising_loss(target + 0.5, eps, x0, t, ABAR, prediction_type, mask)
    assert out.item() == pytest.approx(0.25)


def test_v_target_by_hand():
    x0, eps, t = _batch(2)
    a = ABAR[t].reshape(-1, 1, 1)
    torch.testing.assert_close(
        L.diffusion_target(x0, eps, t, ABAR, "v_prediction"), a.sqrt() * eps - (1 - a).sqrt() * x0
    )
    with pytest.raises(ValueError):
        L.diffusion_target(x0, eps, t, ABAR, "score")


def test_ddim_step_with_exact_predictions_stays_on_the_noising_path():
    x0, eps, t = _batch(3)
    prev = t - 5
    stepped = L.ddim_step(x0, eps, prev, ABAR)
    valid = prev >= 0
    torch.testing.assert_close(stepped[valid], L.add_noise(x0, eps, prev.clamp_min(0), ABAR)[valid])
    torch.testing.assert_close(stepped[~valid], x0[~valid])  # past the last step: x0


def test_ddim_sigma_and_noisy_step_match_diffusers():
    """sigma = eta * sqrt(variance) of diffusers' DDIMScheduler; the step's mean is its eta > 0 update
    without the noise (variance_noise = 0); a negative prev (past the last step) gives sigma 0."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                          prediction_type="sample")
    sched.set_timesteps(10)
    abar = sched.alphas_cumprod
    x0, eps, _ = _batch(4)
    for t in (90, 40, 0):
        prev = torch.tensor(t - 10)
        for eta in (0.3, 1.0):
            sigma = L.ddim_sigma(torch.tensor(t), prev, abar, eta)
            assert sigma.item() == pytest.approx(eta * sched._get_variance(t, int(prev)).sqrt().item(),
                                                 rel=1e-5, abs=1e-7)
            a = abar[t]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            expected = sched.step(x0, t, x_t, eta=eta, variance_noise=torch.zeros_like(x0)).prev_sample
            stepped = L.ddim_step(x0, eps, prev.expand(len(x0)), abar, sigma=sigma.expand(len(x0)))
            torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-5)
    assert L.ddim_sigma(torch.tensor(5), torch.tensor(-1), abar).item() == 0.0


def test_consistency_scalings_by_hand_and_boundary():
    t = torch.tensor([0, 1, 20])
    c_skip, c_out = L.consistency_scalings(t)
    for i, ti in enumerate([0, 1, 20]):
        s = 10.0 * ti
        assert c_skip[i].item() == pytest.approx(0.25 / (s**2 + 0.25), rel=1e-6)
        assert c_out[i].item() == pytest.approx(s / math.sqrt(s**2 + 0.25), rel=1e-6)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    x = torch.randn(3, 4, 2)
    out = L.consistency_output(x, torch.randn(3, 4, 2), t)
    torch.testing.assert_close(out[0], x[0])  # f(x, 0) = x


def test_consistency_loss_mse_and_huber_by_hand():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[1.5, 2.0], [3.0, 0.0]], requires_grad=True)
    assert L.consistency_loss(a, b).item() == pytest.approx((0.25 + 9.0) / 4)
    c = 0.001
    huber = [math.sqrt(0.25 + c * c) - c, 0.0, math.sqrt(9.0 + c * c) - c, 0.0]
    assert L.consistency_loss(a, b, loss_type="huber", huber_c=c).item() == pytest.approx(sum(huber) / 4)
    mask = torch.tensor([True, False])
    assert L.consistency_loss(a, b, mask).item() == pytest.approx(0.25 / 2)
    ga, gb = torch.autograd.grad(L.consistency_loss(a, b), (a, b), allow_unused=True)
    assert gb is None and ga is not None  # the target is detached
    with pytest.raises(ValueError):
        L.consistency_loss(a, b, loss_type="l2")


def test_ema_update_in_place_on_target_only():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]]), torch.tensor([3])]
    online = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]), torch.tensor([7])]
    online_before = [o.clone() for o in online]
    ids = [id(x) for x in target]
    L.ema_update(target, online, decay=0.75)
    torch.testing.assert_close(target[0], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(target[1], torch.tensor([[1.0]]))
    assert target[2].item() == 7  # integer buffers are copied
    assert [id(x) for x in target] == ids
    assert all(torch.equal(a, b) for a, b in zip(online, online_before))
    module_t, module_o = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    L.ema_update(module_t.parameters(), module_o.parameters(), decay=0.0)
    assert torch.equal(module_t.weight, module_o.weight)
    assert not module_t.weight.grad_fn
    with pytest.raises(ValueError):
        L.ema_update(target, online[:2], 0.5)
    with pytest.raises(ValueError):
        L.ema_update(target, online, 1.5)
