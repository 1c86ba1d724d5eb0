"""RL students on real ManiSkill (PickCube, CPU): the residual env with a zero residual is its base, a
short RPD run moves the student toward its teacher, and the CLI trains, saves and re-evaluates."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from embodied_distill.policies.base import build_policy, load_policy
from embodied_distill.policies.rl.modeling_rl import RLPolicy
from embodied_distill.sim.evaluation import evaluate_policy
from embodied_distill.sim.maniskill import ManiSkillRunner, make_single_env
from omegaconf import OmegaConf

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.distill.rpd import (
    RPDConfig,
    env_factory,
    load_teacher,
    student_config,
    teacher_obs_horizon,
    train_rl,
)

pytestmark = pytest.mark.sim

TASK = {"name": "pickcube", "sim": "maniskill", "env_id": "PickCube-v1", "obs_mode": "state",
        "control_mode": "pd_ee_delta_pose", "max_episode_steps": 50, "robot_uids": "panda"}
DS, DA = 42, 7


def _teacher(seed=1):
    """A deterministic stand-in teacher (random MLP over the real state layout, actions within +-0.5)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    norm = Normalizer.fit({"state": rng.normal(0, 0.5, (500, DS)),
                           "action": rng.uniform(-0.5, 0.5, (500, DA))})
    return build_policy("mlp", {"obs_dim": DS, "action_dim": DA, "obs_horizon": 2, "action_horizon": 2,
                                "n_action_steps": 1, "hidden_dims": [32]}, norm).eval()


def test_residual_env_with_zero_residual_reproduces_the_base_rollout():
    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    base = _teacher()
    env = env_factory(runner, history=2, base=base, residual_scale=0.25, seed_start=123)(0)()
    obs, info = env.reset()
    assert info["seed"] == 123 and obs.shape == (2 * DS + DA,)
    ref_base = _teacher()  # same weights, its own history
    ref = make_single_env(runner.env_cfg)
    s, _ = ref.reset(seed=123)
    ref_base.reset()
    for _ in range(15):
        a_ref = ref_base.select_action({"state": torch.as_tensor(s, dtype=torch.float32)[None]})[0].numpy()
        np.testing.assert_allclose(obs[-DA:], a_ref, atol=1e-6)  # the base action is in the observation
        np.testing.assert_allclose(env.executed_action(np.zeros(DA)), np.clip(a_ref, -1, 1), atol=1e-6)
        obs, r, _, _, _ = env.step(np.zeros(DA, np.float32))
        s, r_ref, *_ = ref.step(np.clip(a_ref, -1, 1))
        assert r == pytest.approx(float(np.asarray(r_ref).reshape(-1)[0]), abs=1e-5)
        np.testing.assert_allclose(obs[DS:2 * DS], np.asarray(s).reshape(-1), atol=1e-5)
    env.close()
    ref.close()


def _agreement(policy, teacher, runner, seeds):
    """Mean squared gap between the student's mean action and the teacher's on the student's own states."""
    venv = runner.make_vec_env(num_envs=1)
    gaps = []
    for seed in seeds:
        s = venv.reset([seed])
        policy.reset()
        teacher.reset()
        for _ in range(runner.max_episode_steps):
            st = {"state": torch.as_tensor(s)}
            a = policy.select_action(st)
            gaps.append(float((a - teacher.select_action(st).clamp(-1, 1)).square().mean()))
            s, _, _ = venv.step(a.numpy())
    venv.close()
    return float(np.mean(gaps))


def test_short_rpd_run_moves_the_student_toward_the_teacher(tmp_path):
    """Measurable: teacher agreement on the student's own (deterministic) rollouts, 3 unseen seeds.

    Success cannot move in 1500 env steps with a stand-in teacher; the slow test below checks success
    with a real BC teacher."""
    torch.manual_seed(0)
    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    teacher = _teacher()
    rcfg = RPDConfig(total_steps=1500, n_steps=250, batch_size=125, eval_every=1500, eval_episodes=1,
                     distill_coef=1.0, distill_loss="mse")
    policy = RLPolicy(student_config(rcfg, DS, DA, 2, -1.0, 1.0))
    with torch.no_grad():
        policy.actor_critic.actor[-1].bias.fill_(0.5)  # start away from the teacher
    seeds = [100_000, 100_001, 100_002]
    before = _agreement(policy, teacher, runner, seeds)
    cfg = OmegaConf.create({"seed": 0, "resume": False, "eval": {"seed_start": 100_000, "episodes": 1,
                                                                   "num_envs": 1, "video_episodes": 0}})
    make_env = env_factory(runner, 2, None, 1.0, 2_000_000)
    report = train_rl(cfg, tmp_path, runner, torch.device("cpu"), rcfg, policy, make_env, teacher, 2, 2,
                      "rpd")
    after = _agreement(policy, teacher, runner, seeds)
    assert after < 0.5 * before, (before, after)
    assert report["env_steps"] == 1500 and (tmp_path / "checkpoint" / "model.safetensors").exists()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/distill_loss" in x for x in lines)


def _cli(tmp_path, module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)


def test_cli_rpd_and_residual_rl_train_save_and_evaluate(tmp_path):
    teacher_dir = tmp_path / "teacher"
    _teacher().save_pretrained(teacher_dir)
    common = ["sim=maniskill", "task=pickcube", "teacher=checkpoint", f"teacher.path={teacher_dir}",
              "distill.total_steps=500", "distill.n_steps=250", "distill.batch_size=125",
              "distill.eval_every=500", "distill.eval_episodes=1", "eval.episodes=2", "eval.num_envs=1",
              "eval.video_episodes=0", "device=cpu", "torch_threads=1"]
    for method in ("rpd", "residual_rl"):
        run = tmp_path / method
        out = _cli(tmp_path, "embodied_distill.train", f"distill={method}", f"hydra.run.dir={run}", *common)
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads((run / "report.json").read_text())
        assert report["env_steps"] == 500 and report["episodes"] == 2 and report["curve"]
        assert list((run / "tb").iterdir())
        ev = _cli(tmp_path, "embodied_distill.evaluate", f"checkpoint={run / 'checkpoint'}", "episodes=2",
                  "num_envs=1", "video_episodes=0", f"hydra.run.dir={tmp_path / ('eval_' + method)}")
        assert ev.returncode == 0, ev.stderr[-3000:]
        ev_report = json.loads((tmp_path / ("eval_" + method) / "report.json").read_text())
        assert ev_report["mean_return"] == pytest.approx(report["mean_return"], rel=1e-4)


@pytest.mark.slow
def test_rpd_with_an_imperfect_bc_teacher_improves_success_on_sparse_pushcube(tmp_path):
    """Measurable: success of the deterministic student on 20 unseen seeds, before (random init) vs after
    5000 env steps of RPD on PushCube with the sparse (success-only) reward, guided by an MLP BC teacher
    trained here on 10 demos (about 0.4 success), with the benchmark's settings (lambda 10 MSE, initial
    std exp(-1.5), two-state input). PPO alone ends at 0.01 on this reward after 60k steps
    (benchmarks/results/rpd_vs_ppo_sparse.md). About 100 s on 2 CPU cores."""
    env = {**os.environ, "EMBODIED_DISTILL_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "embodied_distill.train", "task=pushcube", "student=mlp",
                          "demos.n_episodes=10", "distill.steps=2000", "eval.episodes=10", "eval.num_envs=1",
                          "eval.video_episodes=0", "device=cpu", "torch_threads=1",
                          f"hydra.run.dir={tmp_path / 'teacher'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=1200, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.manual_seed(0)
    task = {**TASK, "name": "pushcube", "env_id": "PushCube-v1", "reward_mode": "sparse"}
    runner = ManiSkillRunner(task, sim_backend="cpu")
    teacher = load_teacher(OmegaConf.create({"name": "checkpoint", "path": str(tmp_path / "teacher" /
                                                                               "checkpoint")}), "cpu")
    horizon = teacher_obs_horizon(teacher, None)
    rcfg = RPDConfig(total_steps=5000, eval_every=5000, eval_episodes=2, distill_coef=10.0,
                     log_std_init=-1.5, net_obs_horizon=2)
    probe = make_single_env(runner.env_cfg)
    ds = int(np.prod(probe.observation_space.shape))
    probe.close()
    policy = RLPolicy(student_config(rcfg, ds, DA, horizon, -1.0, 1.0))
    venv = runner.make_vec_env(num_envs=1)
    before = evaluate_policy(policy, venv, 20, 100_000, 50)["success_rate"]
    venv.close()
    cfg = OmegaConf.create({"seed": 0, "resume": False, "eval": {"seed_start": 100_000, "episodes": 20,
                                                                   "num_envs": 1, "video_episodes": 0}})
    make_env = env_factory(runner, horizon, None, 1.0, 3_000_000)
    report = train_rl(cfg, tmp_path / "rpd", runner, torch.device("cpu"), rcfg, policy, make_env, teacher,
                      horizon, horizon, "rpd")
    assert report["success_rate"] >= before + 0.2, (before, report["success_rate"])


def test_resumed_rl_run_continues_from_its_state_and_reports_the_whole_curve(tmp_path):
    """A run stopped at 500 env steps and resumed to 1000 restarts at step 500 (not 0) and its report
    carries the curve points from before the stop (the benchmark's longer PPO budget relies on it)."""
    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    cfg = OmegaConf.create({"seed": 0, "resume": True, "eval": {"seed_start": 100_000, "episodes": 1,
                                                                  "num_envs": 1, "video_episodes": 0}})
    reports = []
    for total in (500, 1000):
        torch.manual_seed(0)
        rcfg = RPDConfig(total_steps=total, n_steps=250, batch_size=125, eval_every=250, eval_episodes=1)
        policy = RLPolicy(student_config(rcfg, DS, DA, 1, -1.0, 1.0))
        reports.append(train_rl(cfg, tmp_path, runner, torch.device("cpu"), rcfg, policy,
                                env_factory(runner, 1, None, 1.0, 2_000_000), None, 1, 1, "ppo"))
    assert [p["env_steps"] for p in reports[0]["curve"]] == [250, 500]
    assert [p["env_steps"] for p in reports[1]["curve"]] == [250, 500, 750, 1000]
    assert reports[1]["curve"][:2] == reports[0]["curve"]
    log = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "eval/success_rate" in x] == [250, 500, 750, 1000]


def test_critic_warmup_trains_the_value_function_and_leaves_the_actor_alone(tmp_path):
    """500 env steps inside a 500-step warm-up (PPO, no teacher): the critic's weights move, the actor's
    mean network and log std are bit-identical to the start."""
    torch.manual_seed(0)
    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    rcfg = RPDConfig(total_steps=500, n_steps=250, batch_size=125, eval_every=500, eval_episodes=1,
                     critic_warmup_steps=500)
    policy = RLPolicy(student_config(rcfg, DS, DA, 2, -1.0, 1.0))
    ac = policy.actor_critic
    actor0 = [p.detach().clone() for p in [*ac.actor.parameters(), ac.log_std]]
    critic0 = [p.detach().clone() for p in ac.critic.parameters()]
    cfg = OmegaConf.create({"seed": 0, "resume": False, "eval": {"seed_start": 100_000, "episodes": 1,
                                                                   "num_envs": 1, "video_episodes": 0}})
    train_rl(cfg, tmp_path, runner, torch.device("cpu"), rcfg, policy,
             env_factory(runner, 2, None, 1.0, 2_000_000), None, 2, 2, "ppo")
    assert all(torch.equal(a, b) for a, b in zip(actor0, [*ac.actor.parameters(), ac.log_std]))
    assert any(not torch.equal(a, b) for a, b in zip(critic0, ac.critic.parameters()))
    log = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flags = [x["train/critic_warmup"] for x in log if "train/critic_warmup" in x]
    assert flags and all(f == 1.0 for f in flags)


def test_rpd_distill_replay_keeps_visited_states_with_teacher_labels_across_a_resume(tmp_path):
    """The replay buffer (capacity 400) is saved with the training state: after 500 env steps it holds the
    last 400 visited states, each with the teacher's action for it; a run resumed to 750 steps continues
    that FIFO (its oldest 150 entries are the saved buffer's newest 150) instead of starting empty."""
    from embodied_distill.checkpoint import load_train_state
    from embodied_distill.distill.rpd import query_teacher

    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    teacher = _teacher()
    cfg = OmegaConf.create({"seed": 0, "resume": True, "eval": {"seed_start": 100_000, "episodes": 1,
                                                                  "num_envs": 1, "video_episodes": 0}})
    saved = []
    for total in (500, 750):
        torch.manual_seed(0)
        rcfg = RPDConfig(total_steps=total, n_steps=250, batch_size=125, eval_every=250, eval_episodes=1,
                         distill_coef=1.0, distill_buffer_size=400, distill_replay_batch=50)
        policy = RLPolicy(student_config(rcfg, DS, DA, 2, -1.0, 1.0))
        train_rl(cfg, tmp_path, runner, torch.device("cpu"), rcfg, policy,
                 env_factory(runner, 2, None, 1.0, 2_000_000), teacher, 2, 2, "rpd")
        saved.append(load_train_state(tmp_path / "train_state")["extra_tensors"])
    first, second = saved
    assert first["replay.obs"].shape == (400, 2 * DS) and second["replay.obs"].shape == (400, 2 * DS)
    labels, _ = query_teacher(teacher, first["replay.obs"], DS, 2, 2, -1.0, 1.0)
    torch.testing.assert_close(first["replay.mean"], labels)
    assert torch.equal(second["replay.obs"][:150], first["replay.obs"][-150:])
    assert not torch.equal(second["replay.obs"][150:], first["replay.obs"][:250])


def test_warmup_updates_are_not_cut_short_by_the_kl_early_stop():
    """With a teacher, a warm-up update moves the actor (distillation), so its approx KL can exceed a tiny
    target_kl; the early stop bounds policy-gradient steps only, so every epoch still runs. After the
    warm-up the same target stops the update in its first epoch."""
    from embodied_distill.policies.rl.modeling_rl import sb3_policy_class
    from stable_baselines3.common.vec_env import DummyVecEnv

    from embodied_distill.distill.rpd import make_learner_class

    torch.manual_seed(0)
    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    rcfg = RPDConfig(total_steps=500, n_steps=250, batch_size=125, n_epochs=4, distill_coef=10.0,
                     target_kl=1e-9, critic_warmup_steps=250)
    policy = RLPolicy(student_config(rcfg, DS, DA, 2, -1.0, 1.0))
    venv = DummyVecEnv([env_factory(runner, 2, None, 1.0, 2_000_000)(0)])
    learner = make_learner_class()(
        sb3_policy_class(), venv, n_steps=rcfg.n_steps, batch_size=rcfg.batch_size, n_epochs=rcfg.n_epochs,
        target_kl=rcfg.target_kl, policy_kwargs={"actor_critic": policy.actor_critic}, seed=0, device="cpu",
        rpd=rcfg, teacher=_teacher(), obs_dim=DS, history=2, teacher_horizon=2)
    learner.learn(250)
    assert learner.last_terms["critic_warmup"] == 1.0 and learner._n_updates == 4
    learner.learn(250, reset_num_timesteps=False)
    assert learner.last_terms["critic_warmup"] == 0.0 and learner._n_updates == 5
    venv.close()


@pytest.mark.parametrize("scores", [[0.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0.1, 0.6, 0.6, 0.3]])
def test_keep_best_ends_with_the_best_validated_weights_across_a_resume(tmp_path, monkeypatch, scores):
    """keep_best validates the start too and ends with the earliest best weights, also when the run was
    stopped and resumed in between. Training is real PPO on ManiSkill; the validation scores are scripted
    (the real ones are all 0 at this budget), and each validated state is recorded to compare against."""
    import embodied_distill.sim.evaluation as evaluation

    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    cfg = OmegaConf.create({"seed": 0, "resume": True, "eval": {"seed_start": 100_000, "episodes": 1,
                                                                  "num_envs": 1, "video_episodes": 0}})
    seen, real = [], evaluation.evaluate_policy

    def scripted(policy, venv, episodes, seed_start, max_steps, **kw):
        if seed_start == 110_000:  # a validation (the final evaluation runs on 100000+)
            seen.append({k: v.clone() for k, v in policy.actor_critic.state_dict().items()})
            return {"success_rate": scores[len(seen) - 1], "mean_return": 0.0}
        return real(policy, venv, episodes, seed_start, max_steps, **kw)

    monkeypatch.setattr(evaluation, "evaluate_policy", scripted)
    for total in (500, 1000):  # stop at 500, resume to 1000
        torch.manual_seed(0)
        rcfg = RPDConfig(total_steps=total, n_steps=250, batch_size=125, eval_every=250, eval_episodes=1,
                         keep_best=True, lr=1e-3)
        policy = RLPolicy(student_config(rcfg, DS, DA, 1, -1.0, 1.0))
        report = train_rl(cfg, tmp_path, runner, torch.device("cpu"), rcfg, policy,
                          env_factory(runner, 1, None, 1.0, 2_000_000), None, 1, 1, "ppo")
    assert len(seen) == 5  # the start, 250, 500 | resumed: 750, 1000
    assert [p["env_steps"] for p in report["curve"]] == [0, 250, 500, 750, 1000]
    pick = int(np.argmax(scores))  # the earliest best
    assert report["selected_step"] == 250 * pick and report["selected_validation_success"] == scores[pick]
    final = load_policy(tmp_path / "checkpoint")[0].actor_critic.state_dict()
    assert all(torch.equal(final[k], seen[pick][k]) for k in seen[pick])
    assert any(not torch.equal(seen[pick][k], seen[-1][k]) for k in seen[pick])  # not the last weights


@pytest.mark.parametrize("confirm_scores, keep_last", [([0.5, 0.7], True), ([0.7, 0.7], False)])
def test_keep_best_confirm_reevaluates_the_kept_against_the_last_weights(tmp_path, monkeypatch,
                                                                       confirm_scores, keep_last):
    """keep_best_confirm_episodes: when the best validation is not the last, the kept and the last weights
    are evaluated again on fresh seeds (120000+) and the better one is saved (the kept one on a tie)."""
    import embodied_distill.sim.evaluation as evaluation

    runner = ManiSkillRunner(TASK, sim_backend="cpu")
    cfg = OmegaConf.create({"seed": 0, "resume": True, "eval": {"seed_start": 100_000, "episodes": 1,
                                                                  "num_envs": 1, "video_episodes": 0}})
    validated, confirmed, real = [], [], evaluation.evaluate_policy

    def scripted(policy, venv, episodes, seed_start, max_steps, **kw):
        state = {k: v.clone() for k, v in policy.actor_critic.state_dict().items()}
        if seed_start == 110_000:  # periodic validations: the start, 250, 500 -> 250 is the best
            validated.append(state)
            return {"success_rate": [0.2, 0.6, 0.1][len(validated) - 1], "mean_return": 0.0}
        if seed_start == 120_000:  # the confirmation: kept weights first, then the last
            assert episodes == 3
            confirmed.append(state)
            return {"success_rate": confirm_scores[len(confirmed) - 1], "mean_return": 0.0}
        return real(policy, venv, episodes, seed_start, max_steps, **kw)

    monkeypatch.setattr(evaluation, "evaluate_policy", scripted)
    torch.manual_seed(0)
    rcfg = RPDConfig(total_steps=500, n_steps=250, batch_size=125, eval_every=250, eval_episodes=1,
                     keep_best=True, keep_best_confirm_episodes=3, lr=1e-3)
    policy = RLPolicy(student_config(rcfg, DS, DA, 1, -1.0, 1.0))
    report = train_rl(cfg, tmp_path, runner, torch.device("cpu"), rcfg, policy,
                      env_factory(runner, 1, None, 1.0, 2_000_000), None, 1, 1, "ppo")
    assert len(validated) == 3 and len(confirmed) == 2
    assert all(torch.equal(confirmed[0][k], validated[1][k]) for k in validated[1])  # the kept (250) ones
    assert all(torch.equal(confirmed[1][k], validated[2][k]) for k in validated[2])  # the last (500) ones
    assert report["keep_best_confirm"] == {"episodes": 3, "kept_step": 250, "kept_success": confirm_scores[0],
                                           "last_step": 500, "last_success": confirm_scores[1]}
    want = validated[2] if keep_last else validated[1]
    assert report["selected_step"] == (500 if keep_last else 250)
    assert report["selected_validation_success"] == (0.1 if keep_last else 0.6)
    final = load_policy(tmp_path / "checkpoint")[0].actor_critic.state_dict()
    assert all(torch.equal(final[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="keep_best_confirm_episodes"):
        RPDConfig(keep_best_confirm_episodes=-1)
