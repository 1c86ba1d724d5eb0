"""RPD loss and RL policies without a simulator: the distillation gradient, lambda = 0 is PPO, the
residual policy with a zero residual is its base, save/load of the RL students."""

import numpy as np
import pytest
import torch
from embodied_distill.policies.base import build_policy, load_policy
from embodied_distill.policies.rl.configuration_rl import ResidualPolicyConfig, RLPolicyConfig
from embodied_distill.policies.rl.modeling_rl import GaussianActorCritic, ResidualPolicy, RLPolicy

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.distill.rpd import (
    DISTILL_LOSSES,
    DistillReplay,
    RPDConfig,
    distill_coef_at,
    distill_term,
    rpd_loss,
)
from embodied_distill.losses import clipped_value_loss, entropy_bonus, normalize_advantages, ppo_clip_loss

DS, DA = 9, 4


def _student(history=1, **kw):
    torch.manual_seed(0)
    return RLPolicy(RLPolicyConfig(obs_dim=DS, action_dim=DA, obs_horizon=history, **kw))


def _base_mlp():
    torch.manual_seed(1)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"state": rng.normal(size=(200, DS)), "action": rng.uniform(-0.5, 0.5, (200, DA))})
    return build_policy("mlp", {"obs_dim": DS, "action_dim": DA, "obs_horizon": 2, "action_horizon": 4,
                                "n_action_steps": 1, "hidden_dims": [32, 32]}, norm)


@pytest.mark.parametrize("kind", DISTILL_LOSSES)
def test_distill_gradient_moves_student_mean_toward_teacher(kind):
    ac = _student(log_std_init=-1.0).actor_critic
    with torch.no_grad():  # a non-trivial starting mean
        ac.actor[-1].weight.normal_(0, 0.05)
    x = torch.randn(64, DS)
    teacher = torch.rand(64, DA) - 0.5
    t_log_std = torch.full((64, DA), float(np.log(0.1)))
    mean0 = ac(x)[0].detach()
    opt = torch.optim.Adam(ac.parameters(), lr=1e-3)  # scale-free across losses
    for _ in range(20):
        mean, log_std, _ = ac(x)
        loss = distill_term(kind, mean, log_std, teacher, t_log_std)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = (mean0 - teacher).square().mean()
    after = (ac(x)[0].detach() - teacher).square().mean()
    assert after < 0.8 * before, (kind, float(before), float(after))
    assert teacher.grad is None  # the teacher side is a constant


def _batch(b=32):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(log_prob=r(b).requires_grad_(), old_log_prob=r(b), advantages=r(b),
                values=r(b).requires_grad_(), old_values=r(b), returns=r(b),
                entropy=r(b).abs().requires_grad_(),
                mean=r(b, DA).requires_grad_(), log_std=torch.zeros(DA, requires_grad=True),
                teacher_mean=r(b, DA), teacher_log_std=torch.zeros(b, DA))


def test_lambda_zero_gives_exactly_the_ppo_loss():
    cfg = RPDConfig(ent_coef=0.01, clip_range_vf=0.3, vf_coef=0.7)
    b = _batch()
    loss0, terms = rpd_loss(**b, cfg=cfg, lam=0.0)
    adv = normalize_advantages(b["advantages"])
    ppo = (ppo_clip_loss(b["log_prob"], b["old_log_prob"], adv, clip=cfg.clip_range)
           + cfg.vf_coef * clipped_value_loss(b["values"], b["old_values"], b["returns"], clip=0.3)
           + entropy_bonus(b["entropy"], coef=cfg.ent_coef))
    assert torch.equal(loss0, ppo)
    assert "distill_loss" not in terms
    g0 = torch.autograd.grad(loss0, [b["log_prob"], b["values"], b["mean"]], allow_unused=True)
    assert g0[2] is None  # the student mean gets no gradient from PPO alone (it flows via log_prob)
    loss1, terms1 = rpd_loss(**b, cfg=cfg, lam=0.5)
    assert torch.allclose(loss1, ppo + 0.5 * terms1["distill_loss"])


def test_critic_warmup_loss_is_value_plus_distillation_without_the_policy_gradient():
    cfg = RPDConfig(ent_coef=0.01, clip_range_vf=0.3, vf_coef=0.7)
    b = _batch()
    value = 0.5 * (b["values"] - b["returns"]).square()  # closed form of the clipped value loss
    clipped = b["old_values"] + (b["values"] - b["old_values"]).clamp(-0.3, 0.3)
    value = torch.maximum(value, 0.5 * (clipped - b["returns"]).square()).mean()
    mse = (b["mean"] - b["teacher_mean"]).square().mean()
    loss0, _ = rpd_loss(**b, cfg=cfg, lam=0.0, critic_warmup=True)
    assert torch.allclose(loss0, 0.7 * value)
    loss, terms = rpd_loss(**b, cfg=cfg, lam=0.5, critic_warmup=True)
    assert torch.allclose(loss, 0.7 * value + 0.5 * mse)
    assert torch.allclose(terms["distill_loss"], mse)
    grads = torch.autograd.grad(loss, [b["log_prob"], b["log_std"], b["entropy"], b["values"], b["mean"]],
                                allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2] is None  # no policy gradient, no entropy
    assert grads[3].abs().sum() > 0 and grads[4].abs().sum() > 0


def test_cosine_schedule_anneals_to_zero():
    cfg = RPDConfig(total_steps=1000, distill_coef=2.0, distill_schedule="cosine")
    assert distill_coef_at(0, cfg) == pytest.approx(2.0)
    assert distill_coef_at(500, cfg) == pytest.approx(1.0)
    assert distill_coef_at(1000, cfg) == pytest.approx(0.0, abs=1e-12)
    assert distill_coef_at(5000, cfg) == pytest.approx(0.0, abs=1e-12)
    assert distill_coef_at(700, RPDConfig(distill_coef=0.3)) == 0.3


def test_config_range_checks():
    with pytest.raises(ValueError, match="distill_loss"):
        RPDConfig(distill_loss="kl")
    with pytest.raises(ValueError, match="batch_size"):
        RPDConfig(n_steps=100, batch_size=200)
    with pytest.raises(ValueError, match="unknown field"):
        RPDConfig.from_cfg({"lamda": 1.0})
    with pytest.raises(ValueError, match="critic_warmup_steps"):
        RPDConfig(critic_warmup_steps=-1)
    with pytest.raises(ValueError, match="set together"):
        RPDConfig(distill_buffer_size=100)
    with pytest.raises(ValueError, match="set together"):
        RPDConfig(distill_replay_batch=10)
    with pytest.raises(ValueError, match=">= 0"):
        RPDConfig(distill_buffer_size=-1, distill_replay_batch=-1)
    with pytest.raises(ValueError, match="net_obs_horizon"):
        RLPolicyConfig(obs_dim=3, action_dim=2, obs_horizon=1, net_obs_horizon=2)
    with pytest.raises(ValueError, match="base_policy"):
        ResidualPolicyConfig(obs_dim=3, action_dim=2, extra_dim=2)


def _residual(base):
    cfg = ResidualPolicyConfig(obs_dim=DS, action_dim=DA, obs_horizon=2, extra_dim=DA,
                               base_policy=base.policy_config_dict(), hidden_dims=(16,))
    pol = ResidualPolicy(cfg, base.normalizer)
    pol.base.load_state_dict(base.state_dict())
    return pol.eval()


def test_residual_with_zero_residual_equals_its_base(tmp_path):
    base = _base_mlp().eval()
    pol = _residual(base)
    assert torch.count_nonzero(pol.actor_critic.actor[-1].weight) == 0  # zero-initialised head
    states = torch.randn(5, 2, DS)
    base_a = base.predict_action_chunk({"state": states})[:, :1].clamp(-1, 1)
    assert torch.equal(pol.predict_action_chunk({"state": states}), base_a)
    base.reset()
    pol.reset()
    for _ in range(4):  # closed loop with history, through select_action
        s = torch.randn(3, DS)
        assert torch.equal(pol.select_action({"state": s}), base.select_action({"state": s}).clamp(-1, 1))
    # a non-zero residual moves the action by residual_scale * mean
    with torch.no_grad():
        pol.actor_critic.actor[-1].bias.fill_(0.2)
    moved = pol.predict_action_chunk({"state": states})
    assert torch.allclose(moved, (base_a + pol.config.residual_scale * 0.2).clamp(-1, 1), atol=1e-6)
    # save / load through the registry: self-contained (base weights and normaliser inside)
    pol.save_pretrained(tmp_path / "ckpt")
    loaded, _, _ = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded, ResidualPolicy)
    assert torch.equal(loaded.predict_action_chunk({"state": states}), moved)


def test_rl_policy_contract_and_save_load(tmp_path):
    pol = _student(history=2, net_obs_horizon=1).eval()
    with torch.no_grad():
        pol.actor_critic.actor[-1].weight.normal_(0, 2.0)
    states = torch.randn(4, 2, DS)
    a = pol.predict_action_chunk({"state": states})
    assert a.shape == (4, 1, DA) and a.abs().max() <= 1.0
    # deterministic mean of the network on the flat layout; net_obs_horizon=1 reads the last state only
    other = states.clone()
    other[:, 0] += 5.0
    assert torch.equal(pol.predict_action_chunk({"state": other}), a)
    pol.save_pretrained(tmp_path / "ckpt")
    loaded, _, _ = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded, RLPolicy)
    assert torch.equal(loaded.predict_action_chunk({"state": states}), a)
    pol.reset()
    assert pol.select_action({"state": states[:, -1]}).shape == (4, DA)


def test_image_encoder_shapes():
    cfg = RLPolicyConfig(obs_dim=DS, action_dim=DA, image_shape=(3, 32, 32), image_features=16)
    ac = GaussianActorCritic(cfg)
    x = torch.cat([torch.randn(2, DS), torch.randint(0, 256, (2, 3 * 32 * 32)).float()], dim=1)
    mean, log_std, value = ac(x)
    assert mean.shape == (2, DA) and log_std.shape == (DA,) and value.shape == (2,)
    with pytest.raises(ValueError, match="flat observation"):
        ac(torch.randn(2, DS))


def test_running_obs_statistics_match_numpy():
    ac = _student().actor_critic
    rng = np.random.default_rng(0)
    a, b = rng.normal(2.0, 3.0, (100, DS)), rng.normal(-1.0, 0.5, (37, DS))
    ac.update_obs_stats(torch.as_tensor(a, dtype=torch.float32))
    ac.update_obs_stats(torch.as_tensor(b, dtype=torch.float32))
    both = np.concatenate([a, b])
    np.testing.assert_allclose(ac.obs_mean.numpy(), both.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ac.obs_var.numpy(), both.var(0), rtol=1e-4, atol=1e-4)
    assert float(ac.obs_count) == 137


def test_distill_replay_is_a_fifo_of_labelled_states_and_round_trips():
    """Capacity 5: after 3 + 4 additions it holds the last 5 states, each with its own labels, oldest first
    in its state dict; samples are rows of it; a reload of the state dict gives the same buffer."""
    buf = DistillReplay(5, flat_dim=3, action_dim=2)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(1)
    obs = torch.arange(7.0)[:, None].expand(7, 3).clone()  # row i is all i
    mean, log_std = obs[:, :2] * 10, -obs[:, :2]
    buf.add(obs[:3], mean[:3], log_std[:3])
    assert buf.size == 3
    buf.add(obs[3:], mean[3:], log_std[3:])
    assert buf.size == 5
    st = buf.state_dict()
    assert st["obs"][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.equal(st["mean"], st["obs"][:, :2] * 10) and torch.equal(st["log_std"], -st["obs"][:, :2])
    o, m, ls = buf.sample(50, generator=torch.Generator().manual_seed(0))
    assert set(o[:, 0].tolist()) <= {2.0, 3.0, 4.0, 5.0, 6.0} and len(set(o[:, 0].tolist())) > 1
    assert torch.equal(m, o[:, :2] * 10) and torch.equal(ls, -o[:, :2])  # labels travel with their state
    again = DistillReplay(5, flat_dim=3, action_dim=2)
    again.load_state_dict(st)
    assert all(torch.equal(again.state_dict()[k], st[k]) for k in st)
    again.add(obs[:6], mean[:6], log_std[:6])  # more than the capacity at once: the last 5 stay
    assert again.state_dict()["obs"][:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
