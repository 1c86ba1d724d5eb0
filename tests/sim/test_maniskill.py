"""Real ManiSkill3 on the CPU backend (lavapipe Vulkan): experts, vector envs, evaluation, demos."""


import numpy as np
import pytest
import torch
from embodied_distill.sim.evaluation import NonFiniteActionError, evaluate_policy
from embodied_distill.sim.maniskill import (
    TASKS,
    ManiSkillEnvConfig,
    ManiSkillRunner,
    ManiSkillVecEnv,
    make_single_env,
    run_expert_episode,
)

from embodied_distill.data.episode_store import EpisodeStore

pytestmark = pytest.mark.sim


@pytest.mark.parametrize("task", ["pickcube", "pushcube", "stackcube"])
def test_scripted_expert_solves_unseen_seeds_within_50_steps(task):
    env = make_single_env(ManiSkillEnvConfig(env_id=TASKS[task], max_episode_steps=50))
    try:
        results = [run_expert_episode(env, task, seed, 50) for seed in (101, 202, 303)]
    finally:
        env.close()
    assert all(r["success"] for r in results), [r["success"] for r in results]
    ep = results[0]
    assert ep["state"].shape[0] == ep["action"].shape[0] == 50 and ep["action"].shape[1] == 7
    assert np.abs(ep["action"]).max() <= 1.0


def test_so100_scripted_expert_is_a_feedback_law_that_picks_the_cube():
    """The SO-100's joint-space expert (sim/so100_expert.py) solves most seeds within 120 steps, emits
    joint targets inside the limits, and its action depends only on the current state: the expert used
    through an episode and one built fresh at each step give the same action."""
    from embodied_distill.sim.so100_expert import SO100PickCubeExpert

    cfg = ManiSkillEnvConfig(robot_uids="so100", control_mode="pd_joint_pos", max_episode_steps=120)
    env = make_single_env(cfg)
    try:
        results = [run_expert_episode(env, "pickcube", seed, 120) for seed in range(100, 110)]
        env.reset(seed=5)
        kept = SO100PickCubeExpert(env.unwrapped)  # called every step, as in an episode
        for _ in range(40):
            a = kept()
            assert np.array_equal(a, SO100PickCubeExpert(env.unwrapped)())  # a fresh one agrees
            env.step(a)
    finally:
        env.close()
    wins = sum(r["success"] for r in results)
    assert wins >= 5, [r["success"] for r in results]
    high = np.array([2.0, 1.5708, 1.5708, 1.8, 3.1416])  # the SO-100's arm joint limits
    low = -high
    for r in results:
        assert r["action"].shape[1] == 6 and r["state"].shape[1] == 36
        assert np.all(r["action"][:, :5] >= low - 1e-4) and np.all(r["action"][:, :5] <= high + 1e-4)
        grip = r["action"][:, 5]
        assert np.all(np.isclose(grip, 0.0) | np.isclose(grip, -0.8))


def test_scripted_expert_refuses_a_controller_it_cannot_drive():
    env = make_single_env(ManiSkillEnvConfig(robot_uids="so100", control_mode="pd_joint_delta_pos",
                                             max_episode_steps=10))
    try:
        with pytest.raises(ValueError, match="pd_joint_pos"):
            run_expert_episode(env, "pickcube", 0, 10)
    finally:
        env.close()
    env = make_single_env(ManiSkillEnvConfig(control_mode="pd_joint_pos", max_episode_steps=10))
    try:
        with pytest.raises(KeyError, match="no scripted expert for panda pickcube"):
            run_expert_episode(env, "pickcube", 0, 10)
    finally:
        env.close()


def test_reset_does_not_depend_on_the_previous_episode():
    """ManiSkill's CPU reset keeps the last episode's contacts (is_grasped stayed 1.0 after a grasp);
    the runner's env must give a freshly built env's first observation whatever ran before."""
    cfg = ManiSkillEnvConfig(env_id="PickCube-v1", max_episode_steps=50)
    fresh, used = make_single_env(cfg), make_single_env(cfg)
    try:
        first, _ = fresh.reset(seed=1)
        before = run_expert_episode(used, "pickcube", 0, 50)
        assert before["success"] and before["state"][-1][18] == 1.0  # ends grasped (is_grasped index)
        again, _ = used.reset(seed=1)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
        assert np.asarray(again).ravel()[18] == 0.0
    finally:
        fresh.close()
        used.close()


class _ConstantPolicy:
    def __init__(self, value):
        self.value = value
        self.resets = 0

    def reset(self):
        self.resets += 1

    def select_action(self, obs):
        return torch.full((obs["state"].shape[0], 7), self.value)


def test_vector_env_is_seeded_and_evaluation_reports(tmp_path):
    cfg = ManiSkillEnvConfig(env_id="PickCube-v1", max_episode_steps=10, sim_backend="cpu")
    single = ManiSkillVecEnv(cfg, num_envs=1)
    ref = [single.reset([s])[0] for s in (5, 6, 7)]
    single.close()
    venv = ManiSkillVecEnv(cfg, num_envs=2, render=True)
    try:
        obs = venv.reset([6, 5])
        np.testing.assert_allclose(obs[0], ref[1], atol=1e-6)
        np.testing.assert_allclose(obs[1], ref[0], atol=1e-6)
        policy = _ConstantPolicy(0.0)
        report = evaluate_policy(policy, venv, episodes=3, seed_start=5, max_steps=10,
                                 video_path=tmp_path / "v.mp4", video_episodes=1)
        assert report["episodes"] == 3 and report["seeds"] == [5, 6, 7]
        assert report["success_rate"] == 0.0 and report["mean_episode_length"] == 10
        assert policy.resets == 2  # one reset per wave of 2 envs
        assert (tmp_path / "v.mp4").stat().st_size > 1000
        with pytest.raises(NonFiniteActionError):
            evaluate_policy(_ConstantPolicy(float("nan")), venv, episodes=1, seed_start=0, max_steps=3)
    finally:
        venv.close()


def test_demo_collection_is_resumable_and_refuses_other_settings(tmp_path):
    runner = ManiSkillRunner({"name": "pickcube", "env_id": "PickCube-v1", "max_episode_steps": 50,
                              "control_mode": "pd_ee_delta_pose", "expert": "scripted"}, sim_backend="cpu")
    path = tmp_path / "demos.zarr"
    s1 = runner.collect_demos(path, 3, seed_start=0, num_workers=2, noise_std=0.3, noise_prob=0.3)
    assert s1["stored"] == 3
    s2 = runner.collect_demos(path, 5, seed_start=0, num_workers=2, noise_std=0.3, noise_prob=0.3)
    assert s2["resumed_from"] == 3 and s2["stored"] == 5
    store = EpisodeStore(path, mode="r")
    seeds = store.episode_meta("seed").tolist()
    assert seeds == sorted(seeds) and len(set(seeds)) == 5
    assert store.get_episode(0)["state"].shape[1] == 42
    with pytest.raises(ValueError, match="generated with"):
        runner.collect_demos(path, 6, noise_std=0.0, noise_prob=0.0)


def test_import_maniskill_h5(tmp_path):
    import gymnasium as gym
    from mani_skill.utils.wrappers.record import RecordEpisode

    from embodied_distill.data.maniskill_h5 import import_maniskill_h5

    env = gym.make("PickCube-v1", obs_mode="state", control_mode="pd_ee_delta_pose", sim_backend="cpu",
                   render_backend="cpu")
    env = RecordEpisode(env, str(tmp_path / "rec"), save_video=False, trajectory_name="t")
    actions = {}
    for seed in (3, 4):
        env.reset(seed=seed)
        actions[seed] = [env.action_space.sample() for _ in range(6)]
        for a in actions[seed]:
            env.step(a)
    env.close()
    summary = import_maniskill_h5(tmp_path / "rec" / "t.h5", tmp_path / "s.zarr", only_success=False)
    assert summary["imported"] == 2
    store = EpisodeStore(tmp_path / "s.zarr", mode="r")
    assert store.episode_meta("seed").tolist() == [3, 4]
    np.testing.assert_allclose(store.get_episode(1)["action"], np.stack(actions[4]), atol=1e-6)
    assert store.get_episode(0)["state"].shape == (6, 42)
    assert import_maniskill_h5(tmp_path / "rec" / "t.h5", tmp_path / "s2.zarr")["skipped_failed"] == 2


@pytest.mark.slow
def test_motion_planner_demos_for_peg_insertion(tmp_path):
    runner = ManiSkillRunner({"name": "peginsertionside", "env_id": "PegInsertionSide-v1",
                              "max_episode_steps": 200, "control_mode": "pd_joint_pos",
                              "expert": "motionplanner"}, sim_backend="cpu")
    summary = runner.collect_demos(tmp_path / "peg.zarr", 2, num_workers=1)
    assert summary["stored"] == 2
    store = EpisodeStore(tmp_path / "peg.zarr", mode="r")
    assert store.get_episode(0)["action"].shape[1] == 8  # pd_joint_pos: 7 joints + gripper
    assert all(0 < n <= 200 for n in np.diff(np.concatenate([[0], store.episode_ends])))


def test_sparse_reward_is_the_success_indicator_and_bad_modes_are_refused():
    """task.reward_mode=sparse: the per-step reward is exactly 1 on success steps and 0 elsewhere
    (an expert PushCube episode has both); the default stays the shaped normalised reward."""
    rewards = {}
    for mode in ("sparse", "normalized_dense"):
        env = make_single_env(ManiSkillEnvConfig(env_id="PushCube-v1", max_episode_steps=50,
                                                 reward_mode=mode))
        try:
            ep = run_expert_episode(env, "pushcube", 101, 50)
            env.reset(seed=101)
            rs, succ = [], []
            for a in ep["action"]:
                _, r, _, _, info = env.step(a)
                rs.append(float(np.asarray(r).ravel()[0]))
                succ.append(bool(np.asarray(info["success"]).ravel()[0]))
        finally:
            env.close()
        rewards[mode] = (np.array(rs), np.array(succ))
    r, s = rewards["sparse"]
    assert s.any() and not s.all()
    np.testing.assert_array_equal(r, s.astype(float))
    dense, _ = rewards["normalized_dense"]
    assert np.all((dense >= 0) & (dense <= 1)) and len(np.unique(dense)) > 10  # shaped, not 0/1
    with pytest.raises(ValueError, match="reward_mode"):
        ManiSkillEnvConfig(reward_mode="shaped")


def test_planner_recorder_noises_the_approach_only_and_records_clean_labels():
    """DART for motion-planner demos: the controller receives the perturbed joint targets while the
    gripper command is unchanged, the clean ones afterwards; the store always gets the clean action."""
    from embodied_distill.sim.maniskill import _RecordSteps

    env = make_single_env(ManiSkillEnvConfig(env_id="PickCube-v1", control_mode="pd_joint_pos",
                                             robot_uids="so100", max_episode_steps=50))
    try:
        rec = _RecordSteps(env, noise_std=0.05, noise_prob=1.0, seed=3)
        obs, _ = rec.reset(seed=3)
        controller = env.unwrapped.agent.controller
        hold = np.asarray(obs[:6], np.float32)  # so100: 5 arm joints + gripper, absolute targets
        gaps = []
        for _ in range(5):
            rec.step(hold)
            target = np.asarray(controller._target_qpos).reshape(-1)
            gaps.append(np.abs(target[:5] - hold[:5]))
            assert target[5] == pytest.approx(hold[5], abs=1e-6)  # the gripper is never perturbed
        gaps = np.stack(gaps)
        assert gaps.min() > 0 and 0.01 < gaps.mean() < 0.1, gaps  # |N(0, 0.05)| has mean 0.04
        closed = hold.copy()
        closed[5] -= 0.5  # the gripper command changes: the approach is over
        for a in (closed, hold):  # ... for good, even if the command returns
            rec.step(a)
            np.testing.assert_allclose(np.asarray(controller._target_qpos).reshape(-1), a, atol=1e-6)
        assert not rec.approach
        np.testing.assert_array_equal(np.stack(rec.actions), np.stack([hold] * 5 + [closed, hold]))
        assert len(rec.states) == 7
    finally:
        env.close()
