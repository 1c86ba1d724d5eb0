"""RL-100: stochastic sampler log-probs, the per-step clipped objective, the OPE gate, transitions, smoke."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from embodied_distill.policies.base import build_policy
from scipy.stats import norm

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.distill.rl100 import (
    DynamicsModel,
    IQLCritic,
    OPEGate,
    RL100Config,
    Transitions,
    build_transitions,
    episode_index,
    fit,
    holdout_episodes,
    ope_estimate,
    ppo_update,
    sparse_success_reward,
)
from embodied_distill.losses import normalize_advantages, ppo_clip_loss


def _policy(min_std=1e-4, steps=10, seed=0, prediction_type="sample"):
    torch.manual_seed(seed)
    data = {"state": np.random.default_rng(0).normal(size=(300, 5)),
            "action": np.random.default_rng(1).uniform(-1, 1, size=(300, 3))}
    cfg = {"obs_dim": 5, "action_dim": 3, "action_horizon": 8, "n_action_steps": 4, "down_dims": [16, 32],
           "step_embed_dim": 16, "sampler": "ddim_eta", "num_inference_steps": steps, "eta": 1.0,
           "min_std": min_std, "seed": 0, "prediction_type": prediction_type}
    return build_policy("diffusion", cfg, Normalizer.fit(data)).eval()


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_sampler_step_log_probs_match_diffusers_mean_and_scipy_gaussian(prediction_type):
    policy = _policy(min_std=1e-4, prediction_type=prediction_type)
    sampler = policy.sampler
    cond = torch.randn(4, 10)
    chain, log_probs = sampler.sample_chain(cond)
    assert chain.shape == (4, 11, 8, 3) and log_probs.shape == (4, 10)
    ref = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                        prediction_type=prediction_type)
    ref.set_timesteps(10)
    for k, t in enumerate(ref.timesteps):
        x = chain[:, k]
        with torch.no_grad():
            out = policy.unet(x, t.expand(4), cond)
        # diffusers' eta=1 step with zero variance noise is the mean; its std is eta * sqrt(variance)
        mean = ref.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = int(t) - 10
        std = max(float(ref._get_variance(t, torch.tensor(prev_t))) ** 0.5, 1e-4)
        expected = norm.logpdf(chain[:, k + 1].double().numpy(), mean.double().numpy(), std).sum(axis=(1, 2))
        np.testing.assert_allclose(log_probs[:, k].double().numpy(), expected, rtol=1e-4, atol=2e-2)
        dist = torch.distributions.Normal(mean.double(), std)
        direct = dist.log_prob(chain[:, k + 1].double()).sum((1, 2))
        torch.testing.assert_close(log_probs[:, k].double(), direct, rtol=1e-4, atol=2e-2)
    # the last DDIM step has no variance of its own: the floor makes it a narrow Gaussian
    assert float(ref._get_variance(ref.timesteps[-1], torch.tensor(-10))) == 0.0
    # re-scoring the recorded chain with the same weights gives the same log-probs, with gradient
    again = sampler.chain_log_probs(chain, cond)
    assert again.requires_grad
    torch.testing.assert_close(again.detach(), log_probs, rtol=1e-5, atol=1e-3)


def test_sampler_is_seeded_and_clamped_and_floor_widens_last_step():
    policy = _policy(min_std=0.1, steps=5)
    obs = {"state": torch.randn(2, 2, 5)}
    policy.reset()
    a = policy.predict_action_chunk(obs)
    policy.reset()
    assert torch.equal(a, policy.predict_action_chunk(obs))
    cond = torch.randn(3, 10)
    x = torch.randn(3, 8, 3)
    _, std_last = policy.sampler.step_distribution(x, 4, cond)
    _, std_first = policy.sampler.step_distribution(x, 0, cond)
    assert float(std_last) == pytest.approx(0.1) and float(std_first) > 0.1


def test_clipped_objective_is_the_core_ppo_loss_at_every_denoising_step():
    policy = _policy(min_std=0.05, steps=4)
    cond = torch.randn(16, 10)
    chain, log_probs = policy.sampler.sample_chain(cond)
    # an "old" policy that differs from the current one, so ratios spread and some are clipped
    old = log_probs + torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(1)) * 0.3
    advantage = torch.randn(16, generator=torch.Generator().manual_seed(2))
    rcfg = RL100Config(ppo_epochs=1, ppo_minibatch=16, clip=0.2, policy_lr=1e-9)
    new = policy.sampler.chain_log_probs(chain, cond).detach()
    adv = normalize_advantages(advantage)[:, None].expand(16, 4)
    expected_core = float(ppo_clip_loss(new, old, adv, clip=0.2))
    ratio = (new - old).exp().numpy()
    a = adv.numpy()
    expected_formula = float(np.mean(-np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)))
    assert 0 < ((np.abs(ratio - 1) > 0.2).mean()) < 1  # both branches are exercised
    opt = torch.optim.SGD(policy.unet.parameters(), lr=0.0)
    stats = ppo_update(policy, opt, cond, chain, old, advantage, rcfg, torch.Generator().manual_seed(0))
    assert stats["loss"] == pytest.approx(expected_core, rel=1e-4, abs=1e-5)
    assert stats["loss"] == pytest.approx(expected_formula, rel=1e-4, abs=1e-5)
    flipped = ppo_update(policy, opt, cond, chain, old, advantage,
                         RL100Config(ppo_epochs=1, ppo_minibatch=16, advantage_sign=-1.0),
                         torch.Generator().manual_seed(0))
    expected_flipped = float(ppo_clip_loss(new, old, -adv, clip=0.2))
    assert flipped["loss"] == pytest.approx(expected_flipped, rel=1e-4, abs=1e-5)


def _toy_transitions(n=4000, seed=0):
    """s' = s + 0.5 a, r = -|s'|^2, actions uniform in [-1, 1]^2 (a behaviour covering every action)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 2, generator=g) * 2 - 1
    a = torch.rand(n, 2, generator=g) * 2 - 1
    s2 = s + 0.5 * a
    return Transitions(s, a, -(s2**2).sum(1), s2, torch.zeros(n))


def test_ope_gate_accepts_a_better_and_rejects_a_worse_policy_on_a_fixed_dataset():
    torch.manual_seed(0)
    data = _toy_transitions()
    rcfg = RL100Config(gamma=0.5, expectile=0.7, hidden=64, critic_lr=1e-3, critic_batch=256)
    gen = torch.Generator().manual_seed(0)
    critic, dynamics = IQLCritic(2, 2, 64), DynamicsModel(2, 2, 64, members=2)
    fit(critic, data, 1500, rcfg, gen, after_step=lambda: critic.update_targets(0.02))
    fit(dynamics, data, 1500, rcfg, gen)
    start = data.obs[:512]

    def behaviour(o):  # the data's own (uniform random) actions
        return torch.rand(o.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def better(o):
        return (-2 * o).clamp(-1, 1)  # drives the state to the origin

    def worse(o):
        return o.sign()  # pushes away from the origin

    est = {name: ope_estimate(p, start, critic, dynamics, horizon=1, gamma=0.5, penalty=1.0)
           for name, p in [("behaviour", behaviour), ("better", better), ("worse", worse)]}
    assert est["better"] > est["behaviour"] > est["worse"], est
    _, _, spread = dynamics.step(start, better(start))
    assert spread.shape == (512,) and bool((spread >= 0).all())
    gate = OPEGate(margin=0.01, best=est["behaviour"])
    assert gate.decide(est["worse"]) == (False, False)
    assert gate.best == est["behaviour"]
    assert gate.decide(est["better"]) == (True, True)
    assert gate.decide(est["worse"]) == (False, False)
    assert gate.decide(est["better"]) == (False, False)  # not better than itself by the margin
    disabled = OPEGate(margin=0.01, enabled=False, best=est["better"])
    assert disabled.decide(est["worse"]) == (False, True)  # verdict reject, accepted anyway


def test_build_transitions_windows_rewards_and_done():
    policy = _policy()
    policy.normalizer = Normalizer({k: {"offset": torch.zeros(d), "scale": torch.ones(d)}
                                    for k, d in (("state", 5), ("action", 3))})
    state = np.arange(6 * 5, dtype=np.float32).reshape(6, 5) / 100
    action = np.linspace(-1, 1, 18, dtype=np.float32).reshape(6, 3)
    ends = np.array([5, 6])
    reward = sparse_success_reward(ends, np.array([1.0, 0.0]))
    assert reward.tolist() == [0, 0, 0, 0, 1, 0]
    tr = build_transitions(state, action, reward, ends, policy)
    assert len(tr) == 6 and tr.obs.shape == (6, 10) and tr.action.shape == (6, 12)
    torch.testing.assert_close(tr.obs[0], torch.as_tensor(np.concatenate([state[0], state[0]])))
    torch.testing.assert_close(tr.obs[2], torch.as_tensor(np.concatenate([state[1], state[2]])))
    torch.testing.assert_close(tr.action[2], torch.as_tensor(np.concatenate([action[2], action[3],
                                                                              action[4], action[4]])))
    assert tr.reward.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert tr.done.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(tr.next_obs[0], torch.as_tensor(np.concatenate([state[3], state[4]])))
    with pytest.raises(ValueError, match="advantage_sign"):
        RL100Config(advantage_sign=0.5)
    with pytest.raises(ValueError, match="unknown"):
        RL100Config.from_cfg({"nope": 1})


def test_holdout_splits_whole_episodes_by_seed():
    """The gate's held-out episodes: whole episodes, the asked fraction, the same ones for the same seed."""
    policy = _policy()
    policy.normalizer = Normalizer({k: {"offset": torch.zeros(d), "scale": torch.ones(d)}
                                    for k, d in (("state", 5), ("action", 3))})
    lengths = [7, 3, 5, 9, 4, 6, 8, 2, 5, 6]
    ends = np.cumsum(lengths)
    state = np.random.default_rng(0).normal(size=(ends[-1], 5)).astype(np.float32)
    action = np.zeros((ends[-1], 3), np.float32)
    tr = build_transitions(state, action, sparse_success_reward(ends, np.ones(10)), ends, policy)
    episode = episode_index(ends)
    assert len(episode) == len(tr) and np.bincount(episode.numpy()).tolist() == lengths
    held = holdout_episodes(10, 0.3, seed=5)
    assert int(held.sum()) == 3 and torch.equal(held, holdout_episodes(10, 0.3, seed=5))
    assert not torch.equal(held, holdout_episodes(10, 0.3, seed=6))
    rows = held[episode]
    kept, out = tr.batch(~rows), tr.batch(rows)
    assert len(kept) + len(out) == len(tr) and len(out) == sum(n for n, h in zip(lengths, held) if h)
    # no state of a held-out episode reaches the training part
    held_states = {tuple(x) for x in out.obs[:, 5:].tolist()}
    assert not held_states & {tuple(x) for x in kept.obs[:, 5:].tolist()}
    assert int(holdout_episodes(10, 0.0, seed=5).sum()) == 0 and int(holdout_episodes(3, 0.01, 0).sum()) == 1
    with pytest.raises(ValueError, match="ope_holdout"):
        RL100Config(ope_holdout=1.0)


def test_rl100_end_to_end_smoke(tmp_path):
    """All four stages on PickCube with tiny budgets; every stage writes its record (~26 s)."""
    import json

    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from embodied_distill.distill import rl100

    overrides = [
        "task=pickcube", "student=diffusion", "distill=rl100", "student.down_dims=[16,32]",
        "student.action_horizon=8", f"demos.dir={tmp_path}/demos", "demos.n_episodes=2",
        "demos.num_workers=1",
        "eval.episodes=2", "eval.num_envs=1", "distill.steps=20", "distill.warmup_steps=5",
        "distill.batch_size=16", "distill.consistency_steps=5", "distill.checkpoint_every=10",
        "distill.rl.num_inference_steps=3", "distill.rl.critic_steps=20", "distill.rl.online_critic_steps=5",
        "distill.rl.rollout_episodes=2", "distill.rl.offline_iterations=1", "distill.rl.online_iterations=1",
        "distill.rl.online_episodes=2", "distill.rl.ppo_rounds=1", "distill.rl.ppo_states=16",
        "distill.rl.ppo_epochs=1", "distill.rl.ppo_minibatch=8", "distill.rl.ope_states=16",
        "distill.rl.gate_enabled=false", "distill.rl.bc_coef=0.1", "distill.rl.ope_holdout=0.5",
    ]
    with initialize_config_module(config_module="embodied_distill.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    runner = instantiate(cfg.sim.runner)(task=OmegaConf.to_container(cfg.task, resolve=True))
    report = rl100.run(cfg, tmp_path / "run", runner, torch.device("cpu"))
    assert report["complete"]
    state = json.loads((tmp_path / "run" / "rl100_state.json").read_text())
    assert [d["iteration"] for d in state["decisions"]] == ["offline_0", "online_0"]
    assert all(d["accepted"] for d in state["decisions"])  # gate disabled
    assert set(state["evals"]) == {"stage1", "offline_0", "online_0", "consistency", "consistency_2"}
    assert set(report["latency_ms_per_action"]) == {"ddim_eta", "consistency"}
    store = rl100.EpisodeStore(tmp_path / "run" / "rl_data.zarr", mode="r")
    assert store.n_episodes == 4 and set(store.keys) == {"state", "action", "reward"}
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()
    assert (tmp_path / "run" / "critic_eval.safetensors").exists()  # the gate's own held-out critic
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("gate/accepted" in m for m in metrics) == 2
    # a rerun resumes: nothing left to do, same decisions
    again = rl100.run(cfg, tmp_path / "run", runner, torch.device("cpu"))
    assert again["decisions"] == report["decisions"]
