"""Point-goal navigation on MuJoCo with two mobile bases: COMPASS's mobility setting at a small scale.

A 4 x 4 m walled arena with three box obstacles; the robot must reach a goal 2.0-3.2 m away and stop
there. Start, goal and obstacles are a pure function of the seed (numpy only), one obstacle is put near
the straight line to the goal so that it usually has to be driven around.

Embodiments (``robot``), both a 0.17 m radius cylinder on planar joints (x, y slides, yaw hinge) driven by
MuJoCo velocity actuators, 10 Hz control (5 physics steps of 0.02 s), contacts with walls and obstacles:

- ``diffdrive``: action (2,) in [-1, 1] = (forward speed / 0.5 m/s, yaw rate / 1.5 rad/s); the sideways
  velocity command is always zero (non-holonomic).
- ``holonomic``: action (3,) in [-1, 1] = (forward, sideways speed / 0.4 m/s, yaw rate / 1.5 rad/s).

Observation (float32, what a real base has: odometry to the goal, its own velocity, a planar range
finder)::

    [goal in the robot frame (2), distance to goal (1), robot-frame velocity (diffdrive: v, omega;
     holonomic: vx, vy, omega), 8 range readings from the robot centre at 45 deg steps (m, capped at 1.5)]

so the diffdrive state has 13 features and the holonomic 14. ``info["success"]``: the robot centre is
within 0.2 m of the goal. Rewards (``reward_mode``): ``normalized_dense`` (progress toward the goal,
a bonus while at the goal, a penalty while touching anything; at most 1 per step), ``dense`` (the same
unscaled) or ``sparse`` (the success flag). Episodes never terminate early (the evaluation contract:
success at the last step).

The scripted expert (:func:`expert_action`) is a state feedback law with privileged map access: a
shortest-path distance field from the goal over an occupancy grid with the obstacles inflated by the
robot's radius, followed 0.4 m ahead (diffdrive turns toward the aim point first, holonomic translates
toward it and turns to face it). It is reactive, so it can label any state (DAgger).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import numpy as np

ROBOTS = {"diffdrive": 2, "holonomic": 3}  # robot -> action dim
CONTROL_MODE = "body_velocity"
ARENA = 2.0  # m: half side of the walled square
RADIUS = 0.17  # m: robot radius
V_MAX = {"diffdrive": 0.5, "holonomic": 0.4}  # m/s
W_MAX = 1.5  # rad/s
CONTROL_DT, SUBSTEPS = 0.1, 5
RAYS, RAY_RANGE = 8, 1.5
GOAL_TOL = 0.2  # m
OBSTACLE_HALF = ((0.25, 0.25), (0.35, 0.15), (0.2, 0.2))  # m: half extents of the three boxes
GRID = 0.05  # m: expert's occupancy grid
INFLATE = RADIUS + 0.08  # m: obstacle inflation for the expert's paths
LOOKAHEAD = 8  # grid cells followed down the distance field


@dataclasses.dataclass
class NavEnvConfig:
    """One navigation embodiment (the ``navigation`` runner's env settings)."""

    robot: str = "diffdrive"
    """``diffdrive`` or ``holonomic``."""
    max_episode_steps: int = 100
    """Episode limit (10 s at 10 Hz)."""
    reward_mode: str = "normalized_dense"
    """normalized_dense | dense | sparse; read by RL methods only."""

    def __post_init__(self):
        if self.robot not in ROBOTS:
            raise ValueError(f"navigation robot must be one of {sorted(ROBOTS)}, got {self.robot!r}")
        if self.reward_mode not in ("normalized_dense", "dense", "sparse"):
            raise ValueError("reward_mode must be normalized_dense, dense or sparse, "
                             f"got {self.reward_mode!r}")
        if self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1")

    def make(self) -> NavEnv:
        """A fresh env (the RL env wrapper builds its simulator through this)."""
        return NavEnv(self)


def _mjcf() -> str:
    a, t, w = ARENA + 0.05, ARENA + 0.1, 0.05  # wall centre offset, half length, half thickness
    walls = "".join(
        f'<geom name="wall{i}" type="box" group="1" pos="{x} {y} 0.15" size="{sx} {sy} 0.15" '
        'rgba=".5 .5 .5 1"/>'
        for i, (x, y, sx, sy) in enumerate([(a, 0, w, t), (-a, 0, w, t), (0, a, t, w), (0, -a, t, w)]))
    boxes = "".join(f'<geom name="obstacle{i}" type="box" group="1" pos="{5 + i} 5 0.15" '
                    f'size="{hx} {hy} 0.15" rgba=".8 .3 .2 1"/>' for i, (hx, hy) in enumerate(OBSTACLE_HALF))
    return f"""
<mujoco model="pointnav">
  <option timestep="{CONTROL_DT / SUBSTEPS}" gravity="0 0 -9.81" integrator="implicitfast"/>
  <default><geom contype="1" conaffinity="1" friction="0.5 0.005 0.0001"/></default>
  <worldbody>
    <geom name="floor" type="plane" size="{ARENA + 0.5} {ARENA + 0.5} 0.1" contype="0" conaffinity="0"/>
    {walls}{boxes}
    <body name="robot" pos="0 0 0.12">
      <joint name="x" type="slide" axis="1 0 0" damping="1"/>
      <joint name="y" type="slide" axis="0 1 0" damping="1"/>
      <joint name="yaw" type="hinge" axis="0 0 1" damping="0.01"/>
      <geom name="chassis" type="cylinder" group="2" size="{RADIUS} 0.1" mass="10" rgba=".2 .4 .8 1"/>
    </body>
  </worldbody>
  <actuator>
    <velocity joint="x" kv="300" forcelimited="true" forcerange="-150 150"/>
    <velocity joint="y" kv="300" forcelimited="true" forcerange="-150 150"/>
    <velocity joint="yaw" kv="3"/>
  </actuator>
</mujoco>"""


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


def sample_layout(seed: int) -> dict[str, np.ndarray]:
    """Start pose (x, y, yaw), goal (2,) and obstacles (3, 3) = (x, y, yaw) of each box, from the seed."""
    rng = np.random.default_rng([seed, 42])
    while True:
        start = rng.uniform(-1.6, 1.6, 2)
        angle = rng.uniform(-np.pi, np.pi)
        goal = start + rng.uniform(2.0, 3.2) * np.array([np.cos(angle), np.sin(angle)])
        if np.all(np.abs(goal) <= 1.6):
            break
    obstacles = []
    for i, (hx, hy) in enumerate(OBSTACLE_HALF):
        for _ in range(1000):
            if i == 0:  # near the middle of the straight line to the goal
                normal = np.array([-np.sin(angle), np.cos(angle)])
                pos = (start + goal) / 2 + rng.uniform(-0.3, 0.3) * normal
            else:
                pos = rng.uniform(-1.7, 1.7, 2)
            yaw = rng.uniform(-np.pi, np.pi)
            reach = np.hypot(hx, hy) + RADIUS + 0.15
            if np.linalg.norm(pos - start) > reach and np.linalg.norm(pos - goal) > reach:
                obstacles.append((pos[0], pos[1], yaw))
                break
        else:
            obstacles.append((5.0 + i, 5.0, 0.0))  # outside the arena: no room for it
    return {"start": np.array([*start, rng.uniform(-np.pi, np.pi)]), "goal": goal,
            "obstacles": np.asarray(obstacles, np.float64)}


class NavEnv:
    """One navigation env with the gymnasium API (``reset(seed=)``, ``step``); numpy in and out."""

    def __init__(self, cfg: NavEnvConfig):
        import gymnasium as gym
        import mujoco

        self.cfg, self._mj = cfg, mujoco
        self.model = mujoco.MjModel.from_xml_string(_mjcf())
        self.data = mujoco.MjData(self.model)
        self.action_dim = ROBOTS[cfg.robot]
        self.obs_dim = 3 + self.action_dim + RAYS
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        self.robot_body = self.model.body("robot").id
        self.chassis = self.model.geom("chassis").id
        self.obstacle_geoms = [self.model.geom(f"obstacle{i}").id for i in range(len(OBSTACLE_HALF))]
        self._geomgroup = np.array([0, 1, 0, 0, 0, 0], np.uint8)  # rays see walls and obstacles only
        self._geomid = np.zeros(1, np.int32)
        self.layout: dict[str, np.ndarray] = {}
        self._field: tuple[np.ndarray, np.ndarray] | None = None
        self._t, self._prev_dist = 0, 0.0

    @property
    def unwrapped(self) -> NavEnv:
        return self

    # ------------------------------------------------------------------ state
    def pose(self) -> np.ndarray:
        """(x, y, yaw) of the robot."""
        return self.data.qpos[:3].copy()

    def distance(self) -> float:
        return float(np.linalg.norm(self.data.qpos[:2] - self.layout["goal"]))

    def in_contact(self) -> bool:
        c = self.data.contact[: self.data.ncon]
        if not self.data.ncon:
            return False
        return bool(np.any((c.geom1 == self.chassis) | (c.geom2 == self.chassis)))

    def _ranges(self, x: float, y: float, yaw: float) -> np.ndarray:
        out = np.full(RAYS, RAY_RANGE)
        origin = np.array([x, y, 0.12])
        for i in range(RAYS):
            a = yaw + 2 * np.pi * i / RAYS
            d = self._mj.mj_ray(self.model, self.data, origin, np.array([np.cos(a), np.sin(a), 0.0]),
                                self._geomgroup, 1, self.robot_body, self._geomid)
            if d >= 0:
                out[i] = min(d, RAY_RANGE)
        return out

    def observe(self) -> np.ndarray:
        x, y, yaw = self.data.qpos[:3]
        c, s = np.cos(yaw), np.sin(yaw)
        dx, dy = self.layout["goal"] - (x, y)
        goal = np.array([c * dx + s * dy, -s * dx + c * dy])
        vx, vy, w = self.data.qvel[:3]
        vel = np.array([c * vx + s * vy, -s * vx + c * vy, w])
        if self.cfg.robot == "diffdrive":
            vel = vel[[0, 2]]
        return np.concatenate([goal, [np.hypot(dx, dy)], vel, self._ranges(x, y, yaw)]).astype(np.float32)

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.layout = sample_layout(0 if seed is None else int(seed))
        self._mj.mj_resetData(self.model, self.data)
        for gid, (x, y, yaw) in zip(self.obstacle_geoms, self.layout["obstacles"], strict=True):
            self.model.geom_pos[gid] = (x, y, 0.15)
            self.model.geom_quat[gid] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        self.data.qpos[:3] = self.layout["start"]
        self._mj.mj_forward(self.model, self.data)
        self._field, self._t, self._prev_dist = None, 0, self.distance()
        return self.observe(), {"seed": seed}

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(-1), -1.0, 1.0)
        if a.shape != (self.action_dim,) or not np.isfinite(a).all():
            raise ValueError(f"{self.cfg.robot} action must be {self.action_dim} finite numbers, "
                             f"got {action!r}")
        v_max = V_MAX[self.cfg.robot]
        vx, vy = a[0] * v_max, (a[1] * v_max if self.cfg.robot == "holonomic" else 0.0)
        w = a[-1] * W_MAX
        contact = False
        for _ in range(SUBSTEPS):  # body-frame command -> world-frame joint velocity targets
            yaw = self.data.qpos[2]
            c, s = np.cos(yaw), np.sin(yaw)
            self.data.ctrl[:] = (c * vx - s * vy, s * vx + c * vy, w)
            self._mj.mj_step(self.model, self.data)
            contact |= self.in_contact()
        self._t += 1
        dist = self.distance()
        success = dist < GOAL_TOL
        progress = float(np.clip(10.0 * (self._prev_dist - dist), -1.0, 1.0))
        self._prev_dist = dist
        dense = 0.5 * progress + float(success) - 0.25 * float(contact)
        reward = {"dense": dense, "normalized_dense": dense / 1.5,
                  "sparse": float(success)}[self.cfg.reward_mode]
        info = {"success": success, "distance": dist, "contact": contact}
        return self.observe(), reward, False, self._t >= self.cfg.max_episode_steps, info

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ expert
    def distance_field(self) -> tuple[np.ndarray, np.ndarray]:
        """Shortest-path length to the goal (n, n) over the inflated occupancy grid and each cell's next
        cell down the field (n, n) as a flat index (-1 where none); computed once per episode."""
        if self._field is None:
            self._field = _distance_field(self.layout)
        return self._field


def _occupied(layout: dict[str, np.ndarray], pts: np.ndarray) -> np.ndarray:
    """(M, 2) points -> (M,) bool: within INFLATE of a wall or an obstacle."""
    blocked = np.any(np.abs(pts) > ARENA - INFLATE, axis=1)
    for (x, y, yaw), (hx, hy) in zip(layout["obstacles"], OBSTACLE_HALF, strict=True):
        c, s = np.cos(yaw), np.sin(yaw)
        d = pts - (x, y)
        local = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], 1)
        outside = np.maximum(np.abs(local) - (hx, hy), 0.0)
        blocked |= np.linalg.norm(outside, axis=1) < INFLATE
    return blocked


def _cell(p: np.ndarray, n: int) -> tuple[int, int]:
    i, j = np.floor((np.asarray(p) + ARENA) / GRID).astype(int)
    return int(np.clip(i, 0, n - 1)), int(np.clip(j, 0, n - 1))


def _distance_field(layout: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    n = int(round(2 * ARENA / GRID))
    centres = (np.arange(n) + 0.5) * GRID - ARENA
    gx, gy = np.meshgrid(centres, centres, indexing="ij")
    free = ~_occupied(layout, np.stack([gx.ravel(), gy.ravel()], 1)).reshape(n, n)
    goal = _cell(layout["goal"], n)
    free[goal] = True
    idx = np.arange(n * n).reshape(n, n)
    rows, cols, weights = [], [], []
    for di, dj in [(1, 0), (0, 1), (1, 1), (1, -1)]:
        a = idx[max(0, -di):n - max(0, di), max(0, -dj):n - max(0, dj)]
        b = idx[max(0, di):n + min(0, di), max(0, dj):n + min(0, dj)]
        ok = free.ravel()[a.ravel()] & free.ravel()[b.ravel()]
        rows.append(a.ravel()[ok])
        cols.append(b.ravel()[ok])
        weights.append(np.full(int(ok.sum()), GRID * np.hypot(di, dj)))
    r, c, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    graph = coo_matrix((w, (r, c)), shape=(n * n, n * n)).tocsr()
    dist = dijkstra(graph, directed=False, indices=int(idx[goal])).reshape(n, n)
    # next cell: the neighbour with the smallest distance (itself at the goal)
    padded = np.pad(dist, 1, constant_values=np.inf)
    best, nxt = dist.copy(), idx.copy()
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            cand = padded[1 + di:n + 1 + di, 1 + dj:n + 1 + dj]
            better = cand < best
            best = np.where(better, cand, best)
            shifted = np.clip(idx + di * n + dj, 0, n * n - 1)
            nxt = np.where(better, shifted, nxt)
    nxt = np.where(np.isfinite(dist), nxt, -1)
    return dist, nxt


def expert_action(env: NavEnv) -> np.ndarray:
    """The scripted expert's (Da,) action in [-1, 1] at the env's current state."""
    dist_field, nxt = env.distance_field()
    n = dist_field.shape[0]
    x, y, yaw = env.pose()
    pos, goal = np.array([x, y]), env.layout["goal"]
    to_goal = float(np.linalg.norm(goal - pos))
    if to_goal < 0.03:
        return np.zeros(env.action_dim)
    cell = _cell(pos, n)
    if not np.isfinite(dist_field[cell]):  # inside the inflated margin: nearest reachable cell
        finite = np.argwhere(np.isfinite(dist_field))
        centres = (finite + 0.5) * GRID - ARENA
        cell = tuple(finite[np.argmin(np.linalg.norm(centres - pos, axis=1))])
    k = int(cell[0] * n + cell[1])
    for _ in range(LOOKAHEAD):
        if nxt.flat[k] < 0 or nxt.flat[k] == k:
            break
        k = int(nxt.flat[k])
    aim = (np.array(divmod(k, n)) + 0.5) * GRID - ARENA
    if to_goal < LOOKAHEAD * GRID or np.linalg.norm(aim - pos) < 1e-6:
        aim = goal
    d = aim - pos
    heading = _wrap(np.arctan2(d[1], d[0]) - yaw)
    speed = min(1.0, to_goal / 0.4)  # slow down into the goal
    w = float(np.clip(2.5 * heading / W_MAX, -1, 1))
    if env.cfg.robot == "diffdrive":
        return np.array([speed * max(0.0, np.cos(heading)) ** 2, w])
    direction = d / np.linalg.norm(d)
    c, s = np.cos(yaw), np.sin(yaw)
    body = np.array([c * direction[0] + s * direction[1], -s * direction[0] + c * direction[1]])
    return np.array([*(speed * body), 0.5 * w])


def run_nav_expert_episode(env: NavEnv, seed: int, max_steps: int, noise_std: float = 0.0,
                           noise_prob: float = 0.0) -> dict[str, Any]:
    """One expert episode with DART noise on the executed action (std in action units, probability per
    step, none in the last 10 steps so it can end at the goal); labels stay clean.

    Returns ``{"state": (T, Do), "action": (T, Da), "success": bool, "seed": int}``.
    """
    rng = np.random.default_rng(seed + 7_919)
    obs, _ = env.reset(seed=seed)
    states, actions, success = [], [], False
    for t in range(max_steps):
        a = expert_action(env)
        executed = a.copy()
        if noise_prob > 0 and t < max_steps - 10 and rng.random() < noise_prob:
            executed = np.clip(executed + rng.normal(0, noise_std, executed.shape), -1, 1)
        states.append(obs)
        actions.append(a.astype(np.float32))
        obs, _, _, trunc, info = env.step(executed)
        success = info["success"]
        if trunc:
            break
    return {"state": np.stack(states), "action": np.stack(actions), "success": bool(success), "seed": seed}


def _expert_episode(env, seed, max_steps, noise_std, noise_prob):
    return run_nav_expert_episode(env, seed, max_steps, noise_std=noise_std, noise_prob=noise_prob)


class NavVecEnv:
    """``num_envs`` in-process navigation envs with the runners' numpy interface (``sim.evaluation``)."""

    backend = "cpu"

    def __init__(self, cfg: NavEnvConfig, num_envs: int = 1):
        self.envs = [NavEnv(cfg) for _ in range(num_envs)]
        self.num_envs = num_envs
        self.action_low = np.full(self.envs[0].action_dim, -1.0, np.float32)
        self.action_high = -self.action_low

    def reset(self, seeds: list[int]) -> np.ndarray:
        return np.stack([e.reset(seed=int(s))[0] for e, s in zip(self.envs, seeds, strict=True)])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        actions = np.asarray(actions).reshape(self.num_envs, -1)
        out = [e.step(a) for e, a in zip(self.envs, actions, strict=True)]
        return (np.stack([o[0] for o in out]), np.array([o[1] for o in out], np.float64),
                np.array([o[4]["success"] for o in out], bool))

    def render(self, i: int = 0) -> np.ndarray:
        """Top-down RGB (200, 200, 3): walls grey, obstacles red, goal green, robot blue."""
        env, px = self.envs[i], 200
        img = np.full((px, px, 3), 235, np.uint8)
        pix = np.stack(np.meshgrid(np.arange(px), np.arange(px), indexing="xy"), -1)
        pts = ((pix + 0.5) / px * 2 * ARENA - ARENA).reshape(-1, 2) * (1, -1)  # image rows grow downward
        for (x, y, yaw), (hx, hy) in zip(env.layout["obstacles"], OBSTACLE_HALF, strict=True):
            c, s = np.cos(yaw), np.sin(yaw)
            d = pts - (x, y)
            inside = (np.abs(c * d[:, 0] + s * d[:, 1]) <= hx) & (np.abs(-s * d[:, 0] + c * d[:, 1]) <= hy)
            img.reshape(-1, 3)[inside] = (200, 70, 50)
        img.reshape(-1, 3)[np.linalg.norm(pts - env.layout["goal"], axis=1) < GOAL_TOL] = (60, 180, 60)
        img.reshape(-1, 3)[np.linalg.norm(pts - env.pose()[:2], axis=1) < RADIUS] = (50, 100, 200)
        return img

    def close(self) -> None:
        pass


class NavigationRunner:
    """Runner for ``sim=navigation`` tasks (``configs/task/pointnav.yaml``): demos from the scripted
    expert, seeded headless evaluation, envs for RL (``env_cfg.make()``).

    Args:
        task: the task config group as a mapping (``robot``, ``max_episode_steps``, ``reward_mode``,
            ``control_mode`` = ``body_velocity``, ``expert`` = ``scripted``).
    """

    def __init__(self, task: dict, **_: Any):
        task = dict(task)
        if task.get("sim", "navigation") != "navigation":
            raise ValueError(f"task {task.get('name')!r} belongs to sim={task.get('sim')!r}, not navigation")
        if task.get("control_mode", CONTROL_MODE) != CONTROL_MODE:
            raise ValueError(f"navigation robots take control_mode {CONTROL_MODE!r}, "
                             f"got {task['control_mode']!r}")
        if task.get("expert", "scripted") != "scripted":
            raise ValueError(f"navigation demos come from the scripted expert, not {task['expert']!r}")
        self.task_name = task["name"]
        self.expert = "scripted"
        robot = task.get("robot", task.get("robot_uids", "diffdrive"))
        self.env_cfg = NavEnvConfig(robot=robot, max_episode_steps=int(task.get("max_episode_steps", 100)),
                                    reward_mode=task.get("reward_mode", "normalized_dense"))

    @property
    def max_episode_steps(self) -> int:
        return self.env_cfg.max_episode_steps

    def demo_attrs(self, noise_std: float, noise_prob: float) -> dict[str, Any]:
        return {"sim": "navigation", "robot": self.env_cfg.robot, "max_episode_steps": self.max_episode_steps,
                "expert": "scripted", "noise_std": float(noise_std), "noise_prob": float(noise_prob)}

    def collect_demos(self, path, n_episodes: int, seed_start: int = 0, num_workers: int = 2,
                      noise_std: float = 0.0, noise_prob: float = 0.0) -> dict[str, Any]:
        from embodied_distill.data.collect import collect_demos

        episode = partial(_expert_episode, max_steps=self.max_episode_steps, noise_std=noise_std,
                          noise_prob=noise_prob)
        return collect_demos(path, self.env_cfg.make, episode, n_episodes, seed_start=seed_start,
                             num_workers=num_workers, attrs=self.demo_attrs(noise_std, noise_prob),
                             desc=f"demos {self.task_name} {self.env_cfg.robot}")

    def label_rollouts(self, policy, episodes: int, seed_start: int) -> dict[str, Any]:
        """DAgger rows: ``policy`` acts, the expert labels every visited state (see ManiSkillRunner)."""
        from embodied_distill.sim.evaluation import label_rollouts

        env = self.env_cfg.make()
        try:
            return label_rollouts(env, policy, lambda e: partial(expert_action, e), episodes, seed_start,
                                  self.max_episode_steps, desc=f"dagger {self.task_name}")
        finally:
            env.close()

    def make_vec_env(self, num_envs: int = 1, render: bool = False) -> NavVecEnv:
        return NavVecEnv(self.env_cfg, num_envs=num_envs)

    def evaluate(self, policy, episodes: int, seed_start: int, num_envs: int = 2,
                 video_path=None, video_episodes: int = 2) -> dict[str, Any]:
        from embodied_distill.sim.evaluation import evaluate_policy

        venv = self.make_vec_env(num_envs=min(num_envs, episodes))
        try:
            report = evaluate_policy(policy, venv, episodes, seed_start, self.max_episode_steps,
                                     video_path=video_path, video_episodes=video_episodes, fps=10,
                                     desc=f"eval {self.task_name} {self.env_cfg.robot}")
        finally:
            venv.close()
        report.update(task=self.task_name, robot=self.env_cfg.robot, sim_backend="cpu",
                      success_definition=f"robot centre within {GOAL_TOL} m of the goal at the last step "
                                         "of a full-length episode")
        return report
