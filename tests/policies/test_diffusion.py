"""Diffusion policy and its samplers (small networks, CPU)."""

import copy

import numpy as np
import pytest
import torch
from embodied_distill.policies.base import build_policy, load_policy
from embodied_distill.policies.diffusion.modeling_diffusion import level_to_timestep, staircase_levels

from embodied_distill import losses as L
from embodied_distill.data.normalizer import Normalizer

SAMPLERS = ["ddpm", "ddim", "streaming", "rti", "consistency"]


def _policy(sampler="ddim", **kw):
    torch.manual_seed(0)
    data = {"state": np.random.default_rng(0).normal(size=(300, 5)),
            "action": np.random.default_rng(1).uniform(-1, 1, size=(300, 3))}
    cfg = {"obs_dim": 5, "action_dim": 3, "action_horizon": 16, "n_action_steps": 4, "down_dims": [16, 32],
           "step_embed_dim": 16, "sampler": sampler, "num_inference_steps": 100 if sampler == "ddpm" else 10,
           "streaming_training_prob": 0.8, "seed": 0, "rti_steps": [4, 2, 0], **kw}
    policy = build_policy("diffusion", cfg, Normalizer.fit(data)).eval()
    policy.consistency_trained.fill_(True)
    return policy


def _batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(b, 2, 5, generator=g), "action": torch.rand(b, 16, 3, generator=g) * 2 - 1,
            "action_is_pad": torch.zeros(b, 16, dtype=torch.bool)}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_shapes_and_determinism_under_seed(sampler):
    policy = _policy(sampler)
    obs = {"state": torch.randn(3, 2, 5)}
    runs = []
    for _ in range(2):
        policy.reset()
        runs.append(torch.stack([policy.predict_action_chunk(obs) for _ in range(3)]))
    assert runs[0].shape == (3, 3, 16, 3)
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])  # same seed after reset -> identical chunks
    policy.reset()
    assert policy.select_action({"state": torch.randn(3, 5)}).shape == (3, 3)


def test_network_calls_per_chunk():
    calls = {}
    for sampler in SAMPLERS:
        policy = _policy(sampler)
        policy.reset()
        obs = {"state": torch.randn(1, 2, 5)}
        policy.predict_action_chunk(obs)  # episode start (streaming / rti warm-up)
        before = policy.sampler.calls
        for _ in range(4):
            policy.predict_action_chunk(obs)
        calls[sampler] = (policy.sampler.calls - before) / 4
    assert calls == {"ddpm": 100, "ddim": 10, "streaming": 1, "rti": 2, "consistency": 1}


def test_streaming_buffer_levels_match_sdp_formula():
    # chunk i of h sits at level floor(N (i + 1) / h) - 1
    for n_levels, h, ta in [(4, 4, 4), (8, 4, 4), (10, 2, 8), (6, 3, 5)]:
        levels = staircase_levels(n_levels, h, ta, h * ta)
        expect = [int(np.floor(n_levels * (i + 1) / h)) - 1 for i in range(h) for _ in range(ta)]
        assert levels.tolist() == expect
    assert level_to_timestep(torch.tensor([-1, 0, 3]), 4, 100).tolist() == [-1, 24, 99]
    # power < 1: N ((l+1)/L)**power; with L = 4, power 0.5: 100 * [0.5, 0.707, 0.866, 1] - 1
    assert level_to_timestep(torch.tensor([-1, 0, 1, 2, 3]), 4, 100, 0.5).tolist() == [-1, 49, 70, 86, 99]
    policy = _policy("streaming", streaming_levels=8)
    policy.reset()
    policy.predict_action_chunk({"state": torch.randn(2, 2, 5)})
    # after popping a clean chunk the buffer is back on the staircase: chunks at 1, 3, 5, 7
    assert policy.sampler.levels.tolist() == [1] * 4 + [3] * 4 + [5] * 4 + [7] * 4
    assert policy.sampler.calls_per_chunk == 2


def test_streaming_eta_step_matches_the_ddim_formula():
    """One buffer step with eta: x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,
    s = eta sqrt((1 - a') / (1 - a) (1 - a / a')), per position; eta = 0 is the deterministic DDIM step."""
    cond = torch.randn(2, 2 * 5)
    for eta in (0.0, 0.5, 1.0):
        policy = _policy("streaming", streaming_eta=eta, streaming_levels=8)
        sampler = policy.sampler
        sampler.buffer = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(1))
        sampler.levels = torch.tensor([1] * 4 + [3] * 4 + [5] * 4 + [7] * 4)
        start = sampler.buffer.clone()
        t = level_to_timestep(sampler.levels, 8, 100)
        t_prev = level_to_timestep(sampler.levels - 1, 8, 100)
        with torch.no_grad():
            x0, eps = policy.denoise(start, t[None].expand(2, -1), cond)
        abar = policy.alphas_cumprod.double()
        a, a_prev = abar[t], torch.where(t_prev >= 0, abar[t_prev.clamp_min(0)], torch.ones_like(abar[t]))
        s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        z = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0))  # the sampler's seed-0 stream
        expected = (a_prev.sqrt()[None, :, None] * x0 + (1 - a_prev - s**2).sqrt()[None, :, None] * eps
                    + s[None, :, None] * z).float()
        sampler.reset()  # reseed the noise stream, keep the buffer
        sampler.buffer, sampler.levels = start.clone(), torch.tensor([1] * 4 + [3] * 4 + [5] * 4 + [7] * 4)
        with torch.no_grad():
            sampler._step(cond, torch.ones(16, dtype=torch.bool))
        torch.testing.assert_close(sampler.buffer, expected, rtol=1e-4, atol=1e-5)
        assert sampler.levels.tolist() == [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4


def test_streaming_training_uses_chunkwise_noise():
    policy = _policy("streaming", streaming_training_prob=1.0)
    t = policy.sample_timesteps(64, 16, torch.device("cpu"))
    assert (t[:, :4] <= t[:, 4:8]).all() and (t[:, 8:12] <= t[:, 12:]).all()
    assert (t[:, 0] != t[:, -1]).all()


def test_rti_with_step_list_zero_returns_the_shifted_guess():
    policy = _policy("rti", rti_steps=[0], rti_gripper="none")
    policy.reset()
    obs = {"state": torch.randn(2, 2, 5)}
    first = policy.sampler(policy.global_cond(policy.stack_obs(obs)))
    expected = torch.cat([first[:, 4:], first[:, -1:].expand(-1, 4, -1)], dim=1)
    second = policy.sampler(policy.global_cond(policy.stack_obs(obs)))
    assert torch.equal(second, expected)
    # with gripper clipping the reused gripper dim is binarised
    policy = _policy("rti", rti_steps=[0], rti_gripper="clip")
    policy.reset()
    policy.sampler(policy.global_cond(policy.stack_obs(obs)))
    guess = policy.sampler(policy.global_cond(policy.stack_obs(obs)))
    assert set(guess[..., -1].unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_training_lowers_denoising_and_consistency_losses(prediction_type):
    """The 1-step head approaches the 10-step DDIM teacher (for an x0 denoiser it starts from its weights)."""
    policy = _policy("ddim", prediction_type=prediction_type).train()
    opt = torch.optim.Adam(policy.unet.parameters(), lr=3e-3)
    batch = _batch(32)

    def eval_loss(fn):
        torch.manual_seed(123)
        with torch.no_grad():
            return float(np.mean([float(fn(batch)[0]) for _ in range(5)]))

    before = eval_loss(policy.compute_loss)
    for _ in range(100):
        opt.zero_grad()
        policy.compute_loss(batch)[0].backward()
        opt.step()
    after = eval_loss(policy.compute_loss)
    assert after < 0.7 * before, (before, after)

    # consistency distillation: the 1-step head must approach the deterministic 10-step DDIM teacher
    policy.eval()
    cond = policy._cond_from_batch(batch)
    x_top = torch.randn(32, 16, 3, generator=torch.Generator().manual_seed(5))
    ddim = policy.sampler  # sampler="ddim", 10 steps
    with torch.no_grad():
        target = ddim.denoise_from(x_top.clone(), cond, ddim.scheduler.timesteps)

    def gap():
        with torch.no_grad():
            one_step = policy.consistency_fn(x_top, torch.full((32,), 99), cond).clamp(-1, 1)
        return float((one_step - target).square().mean())

    policy.init_consistency_from_teacher()
    teacher = copy.deepcopy(policy.unet.state_dict())
    before = gap()
    opt = torch.optim.Adam(policy.consistency_unet.parameters(), lr=1e-3)
    policy.train()
    for _ in range(300):
        opt.zero_grad()
        policy.consistency_loss(batch)[0].backward()
        opt.step()
        policy.update_consistency_ema(0.9)
    policy.eval()
    after = gap()
    assert after < 0.6 * before, (before, after)
    assert bool(policy.consistency_trained)
    assert all(torch.equal(v, policy.unet.state_dict()[k]) for k, v in teacher.items())  # teacher frozen


def test_consistency_head_starts_from_an_x0_denoiser_only():
    x, cond = torch.randn(4, 16, 3), torch.randn(4, 2 * 5)
    t = torch.full((4,), 99)
    sample = _policy("ddim", prediction_type="sample")
    sample.init_consistency_from_teacher()
    with torch.no_grad():
        expected = L.consistency_output(x, sample.unet(x, t, cond), t)  # c_skip x + c_out F_teacher(x)
        torch.testing.assert_close(sample.consistency_fn(x, t, cond), expected)
    eps = _policy("ddim", prediction_type="epsilon")
    fresh = copy.deepcopy(eps.consistency_unet.state_dict())
    eps.init_consistency_from_teacher()  # an epsilon net would start the x0 head at the wrong target
    assert all(torch.equal(v, eps.consistency_unet.state_dict()[k]) for k, v in fresh.items())
    assert not torch.equal(fresh["final.1.weight"], eps.unet.state_dict()["final.1.weight"])


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    policy = _policy("streaming")
    policy.save_pretrained(tmp_path / "ckpt", train_config={"note": "test"})
    loaded, cfg, _ = load_policy(tmp_path / "ckpt")
    assert cfg["policy"]["name"] == "diffusion"
    obs = {"state": torch.randn(2, 2, 5)}
    for sampler in SAMPLERS:
        policy.set_sampler(sampler)
        loaded.set_sampler(sampler)
        assert torch.equal(policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs))


def test_stateful_samplers_are_declared_to_the_bridge():
    assert {s: _policy(s).stateful_select_action for s in SAMPLERS} == {
        "ddpm": False, "ddim": False, "streaming": True, "rti": True, "consistency": False}


def test_consistency_requires_trained_head():
    policy = _policy("ddim")
    policy.consistency_trained.fill_(False)
    with pytest.raises(ValueError, match="no trained consistency head"):
        policy.set_sampler("consistency")


def test_rgb_encoder_and_config_errors():
    from embodied_distill.policies.diffusion.encoders import RgbEncoder

    enc = RgbEncoder(image_size=32, crop_size=28, channels=(8, 16), num_keypoints=4)
    imgs = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8)
    assert enc.train()(imgs).shape == (5, 8)
    out1, out2 = enc.eval()(imgs), enc(imgs)
    assert torch.equal(out1, out2)  # centre crop at evaluation
    with pytest.raises(ValueError, match="sampler"):
        _policy("nosuch")
    with pytest.raises(ValueError, match="divisible"):
        _policy("ddim", action_horizon=9)
