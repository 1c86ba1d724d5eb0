"""ManiSkill3 runner: env construction (CPU vector envs or GPU sim), evaluation, demo experts.

ManiSkill is imported inside functions, so the core package imports without a simulator.

On CPU, ManiSkill refuses ``num_envs > 1`` in one process, so several single envs (wrapped in
``CPUGymWrapper``) run in worker processes under gymnasium's ``AsyncVectorEnv``; with CUDA the GPU
simulator batches ``num_envs`` in one process. Either way the runner returns numpy observations.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np

TASKS = {
    "pickcube": "PickCube-v1",
    "stackcube": "StackCube-v1",
    "pushcube": "PushCube-v1",
    "peginsertionside": "PegInsertionSide-v1",
}
REWARD_MODES = ("normalized_dense", "dense", "sparse")


@dataclasses.dataclass
class ManiSkillEnvConfig:
    """How to build one ManiSkill task."""

    env_id: str = "PickCube-v1"
    """Registered ManiSkill env id."""
    obs_mode: str = "state"
    """"state" (flat vector) is supported; rgb observation encoders arrive with the diffusion policies."""
    control_mode: str = "pd_ee_delta_pose"
    """ManiSkill controller; experts are written for pd_ee_delta_pose (PegInsertionSide: pd_joint_pos)."""
    max_episode_steps: int = 50
    """Episode limit (the env's default for PickCube is 50)."""
    robot_uids: str = "panda"
    """Robot to load (panda, fetch, so100 ship offline)."""
    sim_backend: str = "auto"
    """"auto" (gpu when CUDA is available and num_envs > 1, else cpu), "cpu" or "gpu"."""
    reward_mode: str = "normalized_dense"
    """ManiSkill reward: "normalized_dense" (shaped, at most 1 per step), "dense" (shaped, unscaled) or
    "sparse" (the success indicator per step). Only RL methods read rewards; success is the same."""

    def __post_init__(self):
        if self.obs_mode != "state":
            raise ValueError(f"obs_mode={self.obs_mode!r} is not supported yet; use 'state'")
        if self.sim_backend not in ("auto", "cpu", "gpu"):
            raise ValueError(f"sim_backend must be auto, cpu or gpu, got {self.sim_backend!r}")
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {self.reward_mode!r}")
        if self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1")


def _resolve_backend(cfg: ManiSkillEnvConfig, num_envs: int) -> str:
    if cfg.sim_backend != "auto":
        return cfg.sim_backend
    import torch

    return "gpu" if (torch.cuda.is_available() and num_envs > 1) else "cpu"


def make_single_env(cfg: ManiSkillEnvConfig, render: bool = False):
    """One CPU env returning numpy arrays, terminations ignored (episodes run to the limit)."""
    import mani_skill.envs  # noqa: F401  (registers the envs)
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    env = gym.make(cfg.env_id, obs_mode=cfg.obs_mode, control_mode=cfg.control_mode,
                   robot_uids=cfg.robot_uids, sim_backend="cpu", render_backend="cpu",
                   max_episode_steps=cfg.max_episode_steps, reward_mode=cfg.reward_mode,
                   render_mode="rgb_array" if render else None)
    return ContactFreshReset(CPUGymWrapper(env, ignore_terminations=True, record_metrics=False))


class ContactFreshReset(gym.Wrapper):
    """Makes a CPU reset independent of the previous episode.

    ManiSkill's CPU reset teleports actors without a physics step, so contact-based observations
    (PickCube's ``is_grasped``) report the previous episode's last contacts: after a successful grasp
    the first observation of the next episode says "grasped" (measured: 1.0 instead of 0.0), so demos
    and evaluations depended on which episodes a reused env had run before (two fresh runs of the main
    job stored different demo sets). Here a reset is: reset(seed), one physics step at the initial
    configuration, reset(seed) again (about 6 ms), which gives exactly a freshly built env's observation.
    """

    def __init__(self, env):
        super().__init__(env)
        self._seeds = np.random.default_rng()

    def reset(self, *, seed=None, options=None):
        if seed is None:  # both resets must draw the same initial state
            seed = int(self._seeds.integers(2**31 - 1))
        self.env.reset(seed=seed, options=options)
        self.env.unwrapped.scene.step()
        return self.env.reset(seed=seed, options=options)


def _worker_env_fn(cfg: ManiSkillEnvConfig, render: bool):
    def make():
        import torch

        torch.set_num_threads(1)  # workers must not fight the learner for the cores
        return make_single_env(cfg, render)

    return make


class ManiSkillVecEnv:
    """A minimal numpy vector env over ManiSkill with terminations ignored.

    ``reset(seeds)`` -> obs (N, Do); ``step(actions (N, Da))`` -> (obs, reward (N,), success (N,) bool);
    ``render(i)`` -> (H, W, 3) uint8 of env ``i``.
    """

    def __init__(self, cfg: ManiSkillEnvConfig, num_envs: int = 1, render: bool = False):
        self.cfg, self.num_envs = cfg, num_envs
        self.backend = _resolve_backend(cfg, num_envs)
        self._render = render
        if self.backend == "gpu":
            import mani_skill.envs  # noqa: F401
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            env = gym.make(cfg.env_id, num_envs=num_envs, obs_mode=cfg.obs_mode,
                           control_mode=cfg.control_mode, robot_uids=cfg.robot_uids, sim_backend="gpu",
                           max_episode_steps=cfg.max_episode_steps, reward_mode=cfg.reward_mode,
                           render_mode="rgb_array" if render else None)
            self.env = ManiSkillVectorEnv(env, num_envs, ignore_terminations=True, auto_reset=False)
        elif num_envs == 1:
            self.env = make_single_env(cfg, render)
        else:
            from gymnasium.vector import AsyncVectorEnv

            self.env = AsyncVectorEnv([_worker_env_fn(cfg, render) for _ in range(num_envs)],
                                      context="forkserver")
        space = self.env.single_action_space if hasattr(self.env, "single_action_space") else \
            self.env.action_space
        self.action_low = np.asarray(space.low).reshape(-1)
        self.action_high = np.asarray(space.high).reshape(-1)

    @staticmethod
    def _np(x) -> np.ndarray:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        return np.asarray(x)

    def reset(self, seeds: list[int]) -> np.ndarray:
        if len(seeds) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(seeds)}")
        if self.backend == "gpu" or self.num_envs > 1:
            obs, _ = self.env.reset(seed=list(seeds))
        else:
            obs, _ = self.env.reset(seed=int(seeds[0]))
        return self._np(obs).reshape(self.num_envs, -1).astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        actions = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)
        if self.backend == "gpu":
            import torch

            obs, rew, _, _, info = self.env.step(torch.as_tensor(actions, device=self.env.device))
        elif self.num_envs == 1:
            obs, rew, _, _, info = self.env.step(actions[0])
        else:
            obs, rew, _, _, info = self.env.step(actions)
        success = self._np(info.get("success", np.zeros(self.num_envs, bool))).reshape(self.num_envs)
        return (self._np(obs).reshape(self.num_envs, -1).astype(np.float32),
                self._np(rew).reshape(self.num_envs).astype(np.float64), success.astype(bool))

    def render(self, i: int = 0) -> np.ndarray:
        if self.backend == "gpu":
            frames = self._np(self.env.render())
            return frames[i].astype(np.uint8)
        frame = self.env.render() if self.num_envs == 1 else self.env.call("render")[i]
        frame = self._np(frame)
        return frame.reshape(frame.shape[-3:]).astype(np.uint8)

    def close(self) -> None:
        self.env.close()


# ---------------------------------------------------------------------------- scripted experts
def _yaw(q: np.ndarray) -> float:
    """Yaw of a wxyz quaternion's x axis about world z."""
    w, x, y, z = q
    return float(np.arctan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z)))


def _wrap(angle: float, period: float) -> float:
    return (angle + period / 2) % period - period / 2


def _pose(actor) -> tuple[np.ndarray, np.ndarray]:
    p = actor.pose
    return np.asarray(p.p.cpu().numpy()).reshape(-1, 3)[0], np.asarray(p.q.cpu().numpy()).reshape(-1, 4)[0]


def _ee_action(tcp: np.ndarray, target: np.ndarray, yaw_err: float, grip: float) -> np.ndarray:
    """pd_ee_delta_pose action: normalised position step toward target, yaw correction, gripper."""
    a = np.zeros(7)
    a[:3] = np.clip((target - tcp) / 0.1, -1, 1)  # the controller maps [-1, 1] to +-0.1 m per step
    a[5] = np.clip(-yaw_err / 0.1, -1, 1)
    a[6] = grip
    return a


def _pick_phase(u, obj, tcp, tq) -> tuple[np.ndarray, float, float] | None:
    """Shared reach-and-grasp logic; returns (target, yaw_err, grip) while not yet grasping ``obj``."""
    if bool(np.asarray(u.agent.is_grasping(obj).cpu()).reshape(-1)[0]):
        return None
    p, q = _pose(obj)
    yaw_err = _wrap(_yaw(q) - _yaw(tq), np.pi / 2)
    if np.linalg.norm(p[:2] - tcp[:2]) > 0.01:
        target = p + np.array([0.0, 0.0, 0.05])
        if tcp[2] < p[2] + 0.02:  # too low to move sideways: rise first
            target = np.array([tcp[0], tcp[1], p[2] + 0.05])
        return target, yaw_err, 1.0
    return p.copy(), yaw_err, (-1.0 if np.linalg.norm(p - tcp) < 0.01 else 1.0)


def expert_pickcube(u) -> np.ndarray:
    tcp, tq = _pose(u.agent.tcp)
    reach = _pick_phase(u, u.cube, tcp, tq)
    if reach is not None:
        return _ee_action(tcp, *reach)
    cube, _ = _pose(u.cube)
    goal, _ = _pose(u.goal_site)
    return _ee_action(tcp, goal + (tcp - cube), 0.0, -1.0)


def expert_stackcube(u) -> np.ndarray:
    tcp, tq = _pose(u.agent.tcp)
    a_pos, _ = _pose(u.cubeA)
    b_pos, _ = _pose(u.cubeB)
    reach = _pick_phase(u, u.cubeA, tcp, tq)
    if reach is not None:
        # after releasing on top of B: back off upward instead of re-grasping
        if np.linalg.norm(a_pos[:2] - b_pos[:2]) < 0.01 and a_pos[2] > b_pos[2] + 0.03:
            return _ee_action(tcp, np.array([tcp[0], tcp[1], b_pos[2] + 0.12]), 0.0, 1.0)
        return _ee_action(tcp, *reach)
    above = b_pos + np.array([0.0, 0.0, 0.04]) + (tcp - a_pos)
    if np.linalg.norm(a_pos[:2] - b_pos[:2]) > 0.006 or a_pos[2] < b_pos[2] + 0.035:
        return _ee_action(tcp, above + np.array([0.0, 0.0, 0.02]), 0.0, -1.0)
    if a_pos[2] > b_pos[2] + 0.045:  # lower onto B
        return _ee_action(tcp, above, 0.0, -1.0)
    return _ee_action(tcp, tcp, 0.0, 1.0)  # release


def expert_pushcube(u) -> np.ndarray:
    tcp, _ = _pose(u.agent.tcp)
    cube, _ = _pose(u.obj)
    goal, _ = _pose(u.goal_region)
    direction = goal[:2] - cube[:2]
    direction /= max(np.linalg.norm(direction), 1e-6)
    behind = cube.copy()
    behind[:2] -= direction * 0.05
    behind[2] = 0.02
    rel = tcp[:2] - cube[:2]
    along = float(np.dot(rel, direction))  # < 0: the gripper is behind the cube
    lateral = float(np.linalg.norm(rel - along * direction))
    if tcp[2] < 0.035 and lateral < 0.015 and along < -0.015:  # aligned behind the cube: push
        if np.linalg.norm(goal[:2] - cube[:2]) < 0.03:  # arrived: hold still
            return _ee_action(tcp, tcp, 0.0, -1.0)
        push_to = np.array([*(goal[:2] - direction * 0.04), 0.02])
        return _ee_action(tcp, tcp + 0.5 * (push_to - tcp), 0.0, -1.0)
    if np.linalg.norm(tcp[:2] - behind[:2]) < 0.012:  # above the pushing spot: descend
        return _ee_action(tcp, behind, 0.0, -1.0)
    if tcp[2] < 0.05:  # low but misplaced: rise before moving sideways
        return _ee_action(tcp, np.array([tcp[0], tcp[1], 0.07]), 0.0, -1.0)
    return _ee_action(tcp, behind + np.array([0.0, 0.0, 0.05]), 0.0, -1.0)


EXPERTS = {"pickcube": expert_pickcube, "stackcube": expert_stackcube, "pushcube": expert_pushcube}


JOINT_EXPERTS = {("so100", "pickcube"): "embodied_distill.sim.so100_expert:SO100PickCubeExpert"}
"""Scripted experts for joint-position control, keyed by (robot, task): classes built after each reset
(``expert(env.unwrapped)``) and called once per step. The ``EXPERTS`` functions are for pd_ee_delta_pose."""


def _scripted_expert(env, task: str):
    """The per-step expert callable for this env's robot and controller (after ``env.reset``)."""
    u = env.unwrapped
    robot = str(getattr(u, "robot_uids", "panda"))
    control = str(getattr(u, "control_mode", "pd_ee_delta_pose"))
    if (robot, task) in JOINT_EXPERTS:
        if control != "pd_joint_pos":
            raise ValueError(f"the scripted {robot} {task} expert emits pd_joint_pos targets; "
                             f"the env uses {control!r}")
        import importlib

        module, name = JOINT_EXPERTS[robot, task].split(":")
        expert = getattr(importlib.import_module(module), name)(u)
        return expert, "joint"
    if control != "pd_ee_delta_pose":
        joint = [f"{r}/{t}" for r, t in JOINT_EXPERTS]
        raise KeyError(f"no scripted expert for {robot} {task} under {control!r}; the pd_ee_delta_pose "
                       f"experts are {sorted(EXPERTS)}, the joint-space ones {joint}")
    if task not in EXPERTS:
        raise KeyError(f"no scripted expert for task {task!r}; experts exist for {sorted(EXPERTS)}")
    return partial(EXPERTS[task], u), "ee"


def run_expert_episode(env, task: str, seed: int, max_steps: int, noise_std: float = 0.0,
                       noise_prob: float = 0.0) -> dict[str, Any]:
    """Roll out the scripted expert once (DART-style noise: the executed action is perturbed with
    probability ``noise_prob``, the recorded label stays the clean expert action). The noise is Gaussian
    with std ``noise_std`` in the controller's units: on the translation of a pd_ee_delta_pose action, on
    the arm joint targets (radians) of a joint-space expert.

    Returns ``{"state": (T, Do), "action": (T, Da), "success": bool, "seed": int}``.
    """
    rng = np.random.default_rng(seed + 7_919)
    obs, _ = env.reset(seed=seed)
    expert, kind = _scripted_expert(env, task)
    low = np.asarray(env.action_space.low, np.float64).reshape(-1)
    high = np.asarray(env.action_space.high, np.float64).reshape(-1)
    noisy = slice(0, 3) if kind == "ee" else slice(0, len(low) - 1)  # never the gripper
    states, actions, success = [], [], False
    for t in range(max_steps):
        a = np.asarray(expert(), np.float64)
        executed = a.copy()
        # none in the last 10 steps so the episode can still end at rest (success requires a static
        # robot); the ee experts correct yaw but not roll/pitch, so only their translation is noised
        if noise_prob > 0 and t < max_steps - 10 and rng.random() < noise_prob:
            executed[noisy] += rng.normal(0, noise_std, executed[noisy].shape)
            executed = np.clip(executed, low, high)
        states.append(np.asarray(obs, np.float32).reshape(-1))
        actions.append(a.astype(np.float32))
        obs, _, _, trunc, info = env.step(executed)
        success = bool(np.asarray(info["success"]).reshape(-1)[0])
        if trunc:
            break
    return {"state": np.stack(states), "action": np.stack(actions), "success": success, "seed": seed}


def check_maniskill() -> str:
    """Build PickCube-v1 once on the CPU backend (used by scripts/setup.sh)."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    env = make_single_env(ManiSkillEnvConfig())
    obs, _ = env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()
    return f"ManiSkill OK: PickCube-v1 state obs {tuple(np.asarray(obs).shape)}"


class _RecordSteps:
    """Wraps an env for ManiSkill's motion-planning solutions and records (obs, action) pairs.

    With ``noise_prob > 0`` the executed action is perturbed DART-style during the approach (until the
    gripper command first changes): with that probability per step, Gaussian noise of ``noise_std`` (env
    units: radians for joint-position control) is added to every action dimension but the last (the
    gripper), clipped to the action bounds; the recorded label stays the planner's clean action. Under
    absolute joint-position control the next planned target pulls the arm back, so the demos show
    corrections from states beside the planned path. Grasp and transport run clean: noise there drops
    the object or leaves the arm moving at the end, and the episode would not count as a success.
    """

    def __init__(self, env, noise_std: float = 0.0, noise_prob: float = 0.0, seed: int = 0):
        self.env, self.states, self.actions, self.success = env, [], [], False
        self._obs = None
        self.noise_std, self.noise_prob = float(noise_std), float(noise_prob)
        self._rng = np.random.default_rng(seed + 7_919)
        self._gripper0: float | None = None  # the first gripper command; the approach ends when it changes
        self.approach = True

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, **kwargs):
        self._obs, info = self.env.reset(**kwargs)
        return self._obs, info

    def step(self, action):
        clean = np.asarray(action, np.float32).reshape(-1)
        self.states.append(np.asarray(self._obs, np.float32).reshape(-1))
        self.actions.append(clean)
        executed = action
        if self._gripper0 is None:
            self._gripper0 = float(clean[-1])
        self.approach = self.approach and float(clean[-1]) == self._gripper0
        if self.approach and self.noise_prob > 0 and self._rng.random() < self.noise_prob:
            space = self.env.action_space
            executed = clean.copy()
            executed[:-1] += self._rng.normal(0.0, self.noise_std, len(clean) - 1).astype(np.float32)
            low, high = np.asarray(space.low).reshape(-1), np.asarray(space.high).reshape(-1)
            executed = np.clip(executed, low, high)
            executed = executed.reshape(np.shape(action))
        self._obs, rew, term, trunc, info = self.env.step(executed)
        self.success = bool(np.asarray(info["success"]).reshape(-1)[0])
        return self._obs, rew, term, trunc, info


def run_motionplanner_episode(env, task: str, seed: int, max_steps: int, noise_std: float = 0.0,
                              noise_prob: float = 0.0) -> dict[str, Any]:
    """ManiSkill's own mplib motion-planning solution (needs control_mode pd_joint_pos, numpy < 2), with
    optional DART-style noise on the executed joint targets (see :class:`_RecordSteps`).

    Solutions exist for the panda (PickCube, StackCube, PushCube, PegInsertionSide) and, in mani-skill
    3.0.1, for the so100 arm on PickCube; the robot is read from the env.
    """
    robot = str(getattr(env.unwrapped, "robot_uids", "panda"))
    if robot == "so100":
        from mani_skill.examples.motionplanning.so100 import solutions

        solvers = {"pickcube": solutions.solvePickCube}
    elif robot == "panda":
        from mani_skill.examples.motionplanning.panda import solutions

        solvers = {"pickcube": solutions.solvePickCube, "stackcube": solutions.solveStackCube,
                   "pushcube": solutions.solvePushCube, "peginsertionside": solutions.solvePegInsertionSide}
    else:
        raise KeyError(f"no motion-planning solutions for robot {robot!r} (have panda, so100)")
    if task not in solvers:
        raise KeyError(f"no motion-planning solution for task {task!r} with {robot}; have {sorted(solvers)}")
    rec = _RecordSteps(env, noise_std, noise_prob, seed)
    try:
        solvers[task](rec, seed=seed, debug=False, vis=False)
    except Exception as e:  # the planner fails on some seeds (no IK / path); that episode is dropped
        return {"state": np.zeros((0, 1), np.float32), "action": np.zeros((0, 1), np.float32),
                "success": False, "seed": seed, "error": repr(e)}
    n = min(len(rec.actions), max_steps)
    if n == 0:
        return {"state": np.zeros((0, 1), np.float32), "action": np.zeros((0, 1), np.float32),
                "success": False, "seed": seed}
    return {"state": np.stack(rec.states[:n]), "action": np.stack(rec.actions[:n]),
            "success": rec.success and len(rec.actions) <= max_steps, "seed": seed}


class ManiSkillRunner:
    """Runner contract for ManiSkill tasks: demo collection, vector envs and evaluation.

    Args:
        task: the task config group (``configs/task/<name>.yaml``) as a mapping.
        sim_backend: "auto", "cpu" or "gpu".
    """

    def __init__(self, task: dict, sim_backend: str = "auto"):
        task = dict(task)
        if task.get("sim", "maniskill") != "maniskill":
            raise ValueError(f"task {task.get('name')!r} belongs to sim={task.get('sim')!r}, not maniskill")
        self.task_name = task["name"]
        self.expert = task.get("expert", "scripted")
        if self.expert not in ("scripted", "motionplanner"):
            raise ValueError(f"task.expert must be 'scripted' or 'motionplanner', got {self.expert!r}")
        self.env_cfg = ManiSkillEnvConfig(
            env_id=task["env_id"], obs_mode=task.get("obs_mode", "state"),
            control_mode=task.get("control_mode", "pd_ee_delta_pose"),
            max_episode_steps=int(task["max_episode_steps"]), robot_uids=task.get("robot_uids", "panda"),
            sim_backend=sim_backend, reward_mode=task.get("reward_mode", "normalized_dense"))

    @property
    def max_episode_steps(self) -> int:
        return self.env_cfg.max_episode_steps

    def demo_attrs(self, noise_std: float, noise_prob: float) -> dict[str, Any]:
        """Settings that identify a demo store (a cached store with other settings is refused)."""
        return {"sim": "maniskill", "env_id": self.env_cfg.env_id, "control_mode": self.env_cfg.control_mode,
                "robot_uids": self.env_cfg.robot_uids, "max_episode_steps": self.max_episode_steps,
                "expert": self.expert, "noise_std": float(noise_std), "noise_prob": float(noise_prob)}

    def collect_demos(self, path, n_episodes: int, seed_start: int = 0, num_workers: int = 2,
                      noise_std: float = 0.0, noise_prob: float = 0.0) -> dict[str, Any]:
        from embodied_distill.data.collect import collect_demos

        if self.expert == "scripted":
            episode = partial(_scripted_episode, task=self.task_name, max_steps=self.max_episode_steps,
                              noise_std=noise_std, noise_prob=noise_prob)
            cfg = self.env_cfg
        else:
            episode = partial(_planner_episode, task=self.task_name, max_steps=self.max_episode_steps,
                              noise_std=noise_std, noise_prob=noise_prob)
            cfg = dataclasses.replace(self.env_cfg, max_episode_steps=10 * self.max_episode_steps)
        return collect_demos(path, partial(make_single_env, dataclasses.replace(cfg, sim_backend="cpu")),
                             episode, n_episodes, seed_start=seed_start, num_workers=num_workers,
                             attrs=self.demo_attrs(noise_std, noise_prob), desc=f"demos {self.task_name}")

    def label_rollouts(self, policy, episodes: int, seed_start: int) -> dict[str, Any]:
        """DAgger rows: ``policy`` acts on ``episodes`` seeded episodes (one CPU env), the scripted expert
        labels every visited state -> {"state": (N, Do), "action": (N, Da), "successes": int}."""
        from embodied_distill.sim.evaluation import label_rollouts

        if self.expert != "scripted":
            raise ValueError("DAgger labels need a reactive expert (expert: scripted); a motion planner's "
                             "targets depend on its plan, not on the state the policy reached")
        env = make_single_env(dataclasses.replace(self.env_cfg, sim_backend="cpu"))
        try:
            return label_rollouts(env, policy, lambda e: _scripted_expert(e, self.task_name)[0], episodes,
                                  seed_start, self.max_episode_steps, desc=f"dagger {self.task_name}")
        finally:
            env.close()

    def make_vec_env(self, num_envs: int = 1, render: bool = False) -> ManiSkillVecEnv:
        return ManiSkillVecEnv(self.env_cfg, num_envs=num_envs, render=render)

    def evaluate(self, policy, episodes: int, seed_start: int, num_envs: int = 2,
                 video_path=None, video_episodes: int = 2) -> dict[str, Any]:
        from embodied_distill.sim.evaluation import evaluate_policy

        venv = self.make_vec_env(num_envs=min(num_envs, episodes), render=video_path is not None)
        try:
            report = evaluate_policy(policy, venv, episodes, seed_start, self.max_episode_steps,
                                     video_path=video_path, video_episodes=video_episodes,
                                     desc=f"eval {self.task_name}")
        finally:
            venv.close()
        report.update(task=self.task_name, env_id=self.env_cfg.env_id, control_mode=self.env_cfg.control_mode,
                      sim_backend=venv.backend,
                      success_definition="success flag at the last step of a full-length episode "
                                         "(ManiSkill success_at_end, terminations ignored)")
        return report


def _scripted_episode(env, seed, task, max_steps, noise_std, noise_prob):
    return run_expert_episode(env, task, seed, max_steps, noise_std=noise_std, noise_prob=noise_prob)


def _planner_episode(env, seed, task, max_steps, noise_std, noise_prob):
    return run_motionplanner_episode(env, task, seed, max_steps, noise_std=noise_std, noise_prob=noise_prob)
