"""One LIBERO-style task as a gymnasium env on MuJoCo: Panda + gripper, OSC delta-pose control at 20 Hz.

Observation (a dict; ``obs_mode="state"`` gives only ``state``)::

    state  (D,) float32   [ee_pos (3), ee_quat wxyz (4), finger_qpos (2), joint_pos (7), joint_vel (7),
                           per object in spec order: pos (3), quat wxyz (4)]  (+ one-hot task id, optional)
    rgb    (2, H, W, 3) uint8   cameras ``assets.CAMERAS`` = (agentview, wrist); 128 x 128 by default,
                                rendered without shadows or anti-aliasing

Action: (7,) in [-1, 1], LIBERO's delta end-effector pose + gripper (see ``controller.py``).
``info["success"]``: the goal predicates hold; with ``success_mode="once"`` (LIBERO's rule: an episode
ends at its first success) it stays true after the first success. ``info["goal_now"]``: they hold at this
step. Reward: ``float(info["success"])`` (sparse, as LIBERO). Episodes are truncated at
``max_episode_steps`` and never terminate early.

Initial states are a pure function of the seed (numpy only, objects placed resting on the table), so
``reset(seed=s)`` gives the same state on every machine and MuJoCo 3.x version.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported
logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)  # PyOpenGL's start-up note

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from embodied_distill.sim.libero_style import assets  # noqa: E402
from embodied_distill.sim.libero_style.controller import OSCConfig, OSCController  # noqa: E402
from embodied_distill.sim.libero_style.predicates import SceneView, goal_satisfied  # noqa: E402
from embodied_distill.sim.libero_style.spec import TaskSpec  # noqa: E402

HOME_QPOS = np.array([0.0, -0.0451, 0.0, -2.5139, 0.0, 2.4688, 0.7859])
"""Arm joints with the gripper 20 cm above the table at x = -0.1, pointing straight down."""
FINGER_OPEN = np.array([0.04, -0.04])
ROBOT_STATE_DIM = 23


@dataclasses.dataclass(frozen=True)
class LiberoStyleEnvConfig:
    """How one LIBERO-style env is simulated and observed."""

    obs_mode: str = "state"
    """"state" (proprioception + object poses) or "rgb" (state plus agentview and wrist images)."""
    image_size: int = 128
    """Height = width of the rgb observation, pixels (LIBERO's default 128)."""
    render_size: int = 256
    """Height = width of ``render()`` frames (videos), pixels."""
    control_freq: int = 20
    """Control steps per second (LIBERO: 20 Hz)."""
    sim_timestep: float = 0.002
    """MuJoCo timestep in seconds; ``1 / control_freq`` must be a whole number of timesteps."""
    success_mode: str = "once"
    """"once": success latches at the first step the goal holds (LIBERO); "at_end": the goal must
    hold at the step itself."""
    task_index: int | None = None
    """Append a one-hot task id (``num_tasks`` long) to ``state`` (multi-task suites), or None."""
    num_tasks: int = 1
    """Length of the one-hot task id."""
    osc: OSCConfig = dataclasses.field(default_factory=OSCConfig)
    """Operational-space controller gains and action scaling."""

    def __post_init__(self):
        if self.obs_mode not in ("state", "rgb"):
            raise ValueError(f"obs_mode must be 'state' or 'rgb', got {self.obs_mode!r}")
        if not 16 <= self.image_size <= 1024 or not 16 <= self.render_size <= 1024:
            raise ValueError("image_size and render_size must be in [16, 1024] pixels")
        if self.control_freq < 1 or self.sim_timestep <= 0:
            raise ValueError("control_freq must be >= 1 and sim_timestep > 0")
        n = 1.0 / (self.control_freq * self.sim_timestep)
        if abs(n - round(n)) > 1e-6 or round(n) < 1:
            raise ValueError(f"1/control_freq = {1 / self.control_freq} s is not a whole number of "
                             f"sim_timestep = {self.sim_timestep} s")
        if self.success_mode not in ("once", "at_end"):
            raise ValueError(f"success_mode must be 'once' or 'at_end', got {self.success_mode!r}")
        if self.num_tasks < 1 or (self.task_index is not None and not 0 <= self.task_index < self.num_tasks):
            raise ValueError(f"task_index must be in [0, num_tasks={self.num_tasks}) or None")

    @property
    def substeps(self) -> int:
        return round(1.0 / (self.control_freq * self.sim_timestep))


def _yaw_quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def sample_initial_state(task: TaskSpec, seed: int) -> dict[str, np.ndarray]:
    """The initial state of ``task`` for ``seed``: ``{"arm_qpos": (7,), "objects": (K, 7) pos + quat}``.

    Objects are drawn in the spec's ``init`` order, uniformly in their regions (an object listing several
    regions takes a random one that no earlier object took), rejecting overlaps (footprint discs at least
    1 cm apart), and placed resting on the table with a yaw from their range.
    """
    rng = np.random.default_rng([int(seed), 7_321])
    arm = HOME_QPOS + rng.normal(0.0, task.robot_init_noise, 7) if task.robot_init_noise > 0 else HOME_QPOS
    placed: dict[str, np.ndarray] = {}
    taken: set[str] = set()
    for name, init in task.init:
        free = list(init.regions) if len(init.regions) == 1 else [r for r in init.regions if r not in taken]
        if not free:
            raise RuntimeError(f"{task.full_name}: every region of {name!r} ({list(init.regions)}) is "
                               "taken by earlier objects; list more regions")
        region_name = free[int(rng.integers(len(free)))] if len(free) > 1 else free[0]
        taken.add(region_name)
        obj, region = task.object(name), task.region(region_name)
        for _ in range(200):
            xy = np.array(region.center) + rng.uniform(-1, 1, 2) * np.array(region.half_size)
            if all(np.linalg.norm(xy - p[:2]) > obj.footprint_radius + task.object(n).footprint_radius + 0.01
                   for n, p in placed.items()):
                break
        else:
            raise RuntimeError(f"{task.full_name}: cannot place {name!r} in region {region_name!r} without "
                               f"overlapping {sorted(placed)} (seed {seed}); enlarge the regions")
        yaw = rng.uniform(*init.yaw) if init.yaw[1] > init.yaw[0] else init.yaw[0]
        placed[name] = np.concatenate([[xy[0], xy[1], obj.half_height + 1e-4], _yaw_quat(yaw)])
    return {"arm_qpos": np.asarray(arm, dtype=np.float64),
            "objects": np.stack([placed[o.name] for o in task.objects])}


_MODELS: dict[str, mujoco.MjModel] = {}


def compiled_model(xml: str) -> mujoco.MjModel:
    """Compile an MJCF string once per process (the Panda's visual meshes take ~0.6 s); the model is
    never modified, so envs of the same task share it."""
    if xml not in _MODELS:
        if len(_MODELS) >= 32:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[xml] = mujoco.MjModel.from_xml_string(xml)
    return _MODELS[xml]


def _close_renderers(renderers: dict[int, mujoco.Renderer]) -> None:
    for r in renderers.values():
        try:
            r.close()
        except Exception:  # a context already gone at interpreter exit is not an error
            pass
    renderers.clear()


class LiberoStyleEnv(gym.Env):
    """A LIBERO-style task (see module docstring for spaces).

    Args:
        task: the resolved task spec (``spec.load_task``).
        config: simulation / observation settings.
        max_episode_steps: truncation limit (default: the spec's).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: TaskSpec, config: LiberoStyleEnvConfig | None = None,
                 max_episode_steps: int | None = None):
        self.task, self.cfg = task, config or LiberoStyleEnvConfig()
        self.max_episode_steps = int(max_episode_steps or task.max_episode_steps)
        self.instruction = task.instruction
        self.render_mode = "rgb_array"
        size = max(self.cfg.image_size, self.cfg.render_size)
        xml = assets.scene_xml(task, timestep=self.cfg.sim_timestep, offscreen_size=size)
        self.model = compiled_model(xml)
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._arm_qadr = np.array([m.jnt_qposadr[m.joint(j).id] for j in assets.ARM_JOINTS])
        self._finger_qadr = np.array([m.jnt_qposadr[m.joint(j).id] for j in assets.FINGER_JOINTS])
        if list(self._arm_qadr) != list(range(7)) or list(self._finger_qadr) != [7, 8]:
            raise RuntimeError("unexpected joint order in the Panda model (arm joints must come first)")
        self._obj_qadr = [m.jnt_qposadr[m.joint(f"{o.name}_joint").id] for o in task.objects]
        self._obj_dadr = [m.jnt_dofadr[m.joint(f"{o.name}_joint").id] for o in task.objects]
        self.site_id = m.site(assets.EE_SITE).id
        self.controller = OSCController(m, self.site_id, HOME_QPOS, self.cfg.osc)
        self.scene = SceneView(task, m, self.data)
        self._renderers: dict[int, mujoco.Renderer] = {}
        # free GL contexts before interpreter shutdown (a renderer deleted after EGL is gone raises)
        weakref.finalize(self, _close_renderers, self._renderers)
        self._camera_ids = [m.camera(c).id for c in assets.CAMERAS]
        dim = ROBOT_STATE_DIM + 7 * len(task.objects) + (self.cfg.num_tasks if self.cfg.task_index is not None
                                                          else 0)
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)}
        if self.cfg.obs_mode == "rgb":
            s = self.cfg.image_size
            spaces["rgb"] = gym.spaces.Box(0, 255, (len(assets.CAMERAS), s, s, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        self._t = 0
        self._success = False
        self._seed = None

    # ----------------------------------------------------------------------------- state
    def state_layout(self) -> list[tuple[str, slice]]:
        """Names and slices of the ``state`` vector's parts."""
        parts = [("ee_pos", 3), ("ee_quat", 4), ("finger_qpos", 2), ("joint_pos", 7), ("joint_vel", 7)]
        for o in self.task.objects:
            parts += [(f"{o.name}_pos", 3), (f"{o.name}_quat", 4)]
        if self.cfg.task_index is not None:
            parts.append(("task_onehot", self.cfg.num_tasks))
        out, i = [], 0
        for name, n in parts:
            out.append((name, slice(i, i + n)))
            i += n
        return out

    def set_initial_state(self, init: dict[str, np.ndarray]) -> None:
        """Put the scene into ``init`` (from ``sample_initial_state``) at rest, gripper open."""
        d = self.data
        mujoco.mj_resetData(self.model, d)
        d.qpos[:7] = init["arm_qpos"]
        d.qpos[7:9] = FINGER_OPEN
        for adr, pose in zip(self._obj_qadr, init["objects"]):
            d.qpos[adr:adr + 7] = pose
        mujoco.mj_forward(self.model, d)
        self.controller.reset(d)
        d.ctrl[7:9] = FINGER_OPEN

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        self._seed = int(seed)
        init = (options or {}).get("initial_state") or sample_initial_state(self.task, int(seed))
        self.set_initial_state(init)
        self._t, self._success = 0, False
        return self._obs(), {"success": False, "seed": self._seed}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(7)
        if not np.isfinite(action).all():
            raise ValueError(f"non-finite action {action}")
        m, d = self.model, self.data
        self.controller.set_action(d, action)
        for _ in range(self.cfg.substeps):
            mujoco.mj_step1(m, d)
            self.controller.apply(d)
            mujoco.mj_step2(m, d)
        mujoco.mj_forward(m, d)
        self._t += 1
        now = goal_satisfied(self.scene)
        self._success = (self._success or now) if self.cfg.success_mode == "once" else now
        truncated = self._t >= self.max_episode_steps
        return self._obs(), float(self._success), False, truncated, {"success": self._success,
                                                                      "goal_now": now}

    def _state(self) -> np.ndarray:
        d = self.data
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, d.site_xmat[self.site_id])
        parts = [d.site_xpos[self.site_id], quat * (1 if quat[0] >= 0 else -1), d.qpos[7:9], d.qpos[:7],
                 d.qvel[:7]]
        for adr in self._obj_qadr:
            q = d.qpos[adr + 3:adr + 7]
            parts += [d.qpos[adr:adr + 3], q * (1 if q[0] >= 0 else -1)]
        if self.cfg.task_index is not None:
            onehot = np.zeros(self.cfg.num_tasks)
            onehot[self.cfg.task_index] = 1.0
            parts.append(onehot)
        return np.concatenate(parts).astype(np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {"state": self._state()}
        if self.cfg.obs_mode == "rgb":
            obs["rgb"] = np.stack([self._render_camera(c, self.cfg.image_size) for c in self._camera_ids])
        return obs

    # ----------------------------------------------------------------------------- rendering
    def _render_camera(self, camera_id: int, size: int) -> np.ndarray:
        r = self._renderers.get(size)
        if r is None:
            try:
                r = mujoco.Renderer(self.model, size, size)
            except Exception as e:  # no GL context: say how to get one
                gl = os.environ.get("MUJOCO_GL")
                raise RuntimeError(f"MuJoCo cannot render offscreen with MUJOCO_GL={gl} ({e!r}); use "
                                   "MUJOCO_GL=egl (libegl1) or MUJOCO_GL=osmesa (apt libosmesa6)") from e
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                r.scene.flags[flag] = 0
            self._renderers[size] = r
        r.update_scene(self.data, camera=camera_id)
        return r.render()

    def render(self) -> np.ndarray:
        """(render_size, 2 * render_size, 3) uint8: agentview and wrist side by side."""
        s = self.cfg.render_size
        return np.concatenate([self._render_camera(c, s) for c in self._camera_ids], axis=1)

    def close(self) -> None:
        _close_renderers(self._renderers)

    # ----------------------------------------------------------------------------- privileged access
    @property
    def seed_used(self) -> int | None:
        return self._seed

    @property
    def elapsed_steps(self) -> int:
        return self._t
