"""Runner for the built-in LIBERO-style suite (``sim=libero``): demos, vector envs, evaluation.

``task=<suite>/<task>`` runs one task; ``task=<suite>`` runs every task of the suite: demos of all
tasks go into one store (seed ``s`` runs task ``s % num_tasks``), one policy is trained on them, and
evaluation reports per-task and mean success. Since a state-only policy cannot read the instruction,
suite runs append a one-hot task id to the state (``task_onehot``); the instruction is also in every
observation (``obs["instruction"]``) and in the demo store (``meta/instruction``) for
language-conditioned policies.

Evaluation uses the fixed initial states of each task (seeds ``EVAL_SEED_START`` + 0 ... 49 when
``eval.seed_start`` is 100000, the default), which no demonstration uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from embodied_distill.sim.libero_style.demos import EVAL_SEED_START, NUM_EVAL_STATES
from embodied_distill.sim.libero_style.spec import TaskSpec, list_suites, list_tasks, load_task

CONTROL_MODE = "osc_pose"


def _env_module():
    # imported lazily: env.py sets MUJOCO_GL and imports mujoco
    from embodied_distill.sim.libero_style import env

    return env


def _make_env(spec: TaskSpec, config, max_episode_steps: int):
    def make():
        import torch

        torch.set_num_threads(1)  # worker processes must not fight the learner for the cores
        return _env_module().LiberoStyleEnv(spec, config, max_episode_steps=max_episode_steps)

    return make


class LiberoStyleVecEnv:
    """A numpy vector env over one LIBERO-style task, terminations ignored (as ``ManiSkillVecEnv``).

    ``reset(seeds)`` -> obs; ``step(actions (N, 7))`` -> (obs, reward (N,), success (N,) bool);
    ``render(i)`` -> (S, 2S, 3) uint8 (agentview | wrist). ``obs`` is a dict: ``state`` (N, D) float32,
    ``rgb`` (N, 2, H, W, 3) uint8 when ``obs_mode="rgb"``, and ``instruction`` (a list of N strings).
    Several envs run in worker processes (gymnasium ``AsyncVectorEnv``, forkserver).
    """

    def __init__(self, spec: TaskSpec, config, num_envs: int = 1, max_episode_steps: int | None = None):
        if num_envs < 1:
            raise ValueError("num_envs must be >= 1")
        self.spec, self.config, self.num_envs = spec, config, num_envs
        self.max_episode_steps = int(max_episode_steps or spec.max_episode_steps)
        self.instruction = spec.instruction
        make = _make_env(spec, config, self.max_episode_steps)
        if num_envs == 1:
            self.env = _env_module().LiberoStyleEnv(spec, config, max_episode_steps=self.max_episode_steps)
        else:
            from gymnasium.vector import AsyncVectorEnv

            self.env = AsyncVectorEnv([make for _ in range(num_envs)], context="forkserver")
        self.action_low = -np.ones(7, np.float32)
        self.action_high = np.ones(7, np.float32)
        self._render_warned = False

    def _batch(self, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {k: np.asarray(v).reshape(self.num_envs, *np.asarray(v).shape[-self._ndim(k):])
                               for k, v in obs.items()}
        out["instruction"] = [self.instruction] * self.num_envs
        return out

    @staticmethod
    def _ndim(key: str) -> int:
        return 4 if key == "rgb" else 1

    def reset(self, seeds: list[int]) -> dict[str, Any]:
        if len(seeds) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(seeds)}")
        if self.num_envs == 1:
            obs, _ = self.env.reset(seed=int(seeds[0]))
        else:
            obs, _ = self.env.reset(seed=[int(s) for s in seeds])
        return self._batch(obs)

    def step(self, actions: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        actions = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, 7)
        if self.num_envs == 1:
            obs, rew, _, _, info = self.env.step(actions[0])
        else:
            obs, rew, _, _, info = self.env.step(actions)
        success = np.asarray(info["success"], dtype=bool).reshape(self.num_envs)
        return self._batch(obs), np.asarray(rew, np.float64).reshape(self.num_envs), success

    def render(self, i: int = 0) -> np.ndarray:
        """Frame of env ``i``; a black frame (and one warning) when offscreen rendering is unavailable,
        so that a machine without EGL/OSMesa still evaluates (only its video is blank)."""
        try:
            if self.num_envs == 1:
                return self.env.render()
            return np.asarray(self.env.call("render")[i])
        except Exception as e:
            if not self._render_warned:
                warnings.warn(f"rendering failed, video frames will be blank: {e}", stacklevel=2)
                self._render_warned = True
            s = self.config.render_size
            return np.zeros((s, 2 * s, 3), np.uint8)

    def close(self) -> None:
        self.env.close()


class LiberoStyleRunner:
    """Runner contract for the built-in LIBERO-style suite.

    Args:
        task: the task config group as a mapping: ``name``, ``sim: libero``, ``suite``, ``task`` (a task
            of the suite, or None for the whole suite), ``obs_mode`` (state | rgb), ``control_mode``
            (osc_pose), ``max_episode_steps`` (None: each task's own), ``expert`` (scripted),
            ``task_onehot`` (default: true for a whole suite).
        image_size: rgb observation size, pixels.
        render_size: video frame size, pixels.
        success_mode: "once" (LIBERO: the first success ends the episode) or "at_end".
    """

    def __init__(self, task: dict, image_size: int = 128, render_size: int = 256, success_mode: str = "once"):
        task = dict(task)
        if task.get("sim", "libero") != "libero":
            raise ValueError(f"task {task.get('name')!r} belongs to sim={task.get('sim')!r}, not libero")
        suite = task.get("suite")
        if suite not in list_suites():
            raise ValueError(f"task.suite={suite!r} is not a built-in LIBERO-style suite; "
                             f"suites: {list_suites()}")
        self.task_name = str(task.get("name") or suite)
        self.suite = suite
        names = [task["task"]] if task.get("task") else list_tasks(suite)
        self.specs = [load_task(suite, n) for n in names]
        self.multi_task = not task.get("task")
        if task.get("expert", "scripted") != "scripted":
            raise ValueError(f"task.expert must be 'scripted', got {task.get('expert')!r}")
        if task.get("control_mode", CONTROL_MODE) != CONTROL_MODE:
            raise ValueError(f"task.control_mode must be {CONTROL_MODE!r} (LIBERO's 7-D delta end-effector "
                             f"pose + gripper), got {task.get('control_mode')!r}")
        self.obs_mode = task.get("obs_mode", "state")
        steps = task.get("max_episode_steps")
        if steps is not None and int(steps) < 1:
            raise ValueError("task.max_episode_steps must be >= 1 (or null for each task's own)")
        self._steps_override = None if steps is None else int(steps)
        onehot = bool(task.get("task_onehot", self.multi_task))
        env = _env_module()
        self.env_configs = [
            env.LiberoStyleEnvConfig(obs_mode=self.obs_mode, image_size=image_size, render_size=render_size,
                                     success_mode=success_mode, task_index=i if onehot else None,
                                     num_tasks=len(self.specs))
            for i in range(len(self.specs))]

    # ----------------------------------------------------------------------------- contract
    @property
    def max_episode_steps(self) -> int | None:
        """The step limit of a single-task runner (None for a suite without an override)."""
        if self._steps_override is not None:
            return self._steps_override
        return self.specs[0].max_episode_steps if not self.multi_task else None

    def steps_for(self, index: int) -> int:
        return self._steps_override or self.specs[index].max_episode_steps

    def instructions(self) -> list[str]:
        return [s.instruction for s in self.specs]

    def spec_hash(self) -> str:
        """Hash of the resolved task specs: demos made from an edited spec are refused."""
        text = json.dumps([dataclasses.asdict(s) | {"source": ""} for s in self.specs], sort_keys=True,
                          default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def demo_attrs(self, noise_std: float, noise_prob: float) -> dict[str, Any]:
        """Settings that identify a demo store (a cached store with other settings is refused)."""
        return {"sim": "libero", "suite": self.suite, "tasks": [s.name for s in self.specs],
                "control_mode": CONTROL_MODE, "obs_mode": self.obs_mode,
                "max_episode_steps": [self.steps_for(i) for i in range(len(self.specs))],
                "task_onehot": self.env_configs[0].task_index is not None, "expert": "scripted",
                "spec_hash": self.spec_hash(), "noise_std": float(noise_std), "noise_prob": float(noise_prob)}

    def collect_demos(self, path, n_episodes: int, seed_start: int = 0, num_workers: int = 2,
                      noise_std: float = 0.0, noise_prob: float = 0.0) -> dict[str, Any]:
        """Scripted-expert demos into the episode store at ``path`` (resumable; see ``demos.py``)."""
        from embodied_distill.sim.libero_style.demos import collect_demos

        setup = {"specs": self.specs, "env_configs": self.env_configs,
                 "max_steps": [self.steps_for(i) for i in range(len(self.specs))],
                 "noise_std": float(noise_std), "noise_prob": float(noise_prob), "tail_steps": 10,
                 "record_rgb": self.obs_mode == "rgb"}
        return collect_demos(path, setup, n_episodes, seed_start=seed_start, num_workers=num_workers,
                             attrs=self.demo_attrs(noise_std, noise_prob), desc=f"demos {self.task_name}")

    def make_vec_env(self, num_envs: int = 1, render: bool = False, task_index: int = 0) -> LiberoStyleVecEnv:
        """Vector env over task ``task_index`` of this runner (``render`` is accepted for API parity:
        every LIBERO-style env can render)."""
        return LiberoStyleVecEnv(self.specs[task_index], self.env_configs[task_index], num_envs=num_envs,
                                 max_episode_steps=self.steps_for(task_index))

    def initial_states(self, task_index: int = 0, n: int = NUM_EVAL_STATES,
                       seed_start: int = EVAL_SEED_START) -> list[dict[str, np.ndarray]]:
        """The fixed evaluation initial states of a task (LIBERO's ``get_task_init_states``)."""
        sample = _env_module().sample_initial_state
        return [sample(self.specs[task_index], seed_start + i) for i in range(n)]

    def evaluate(self, policy, episodes: int, seed_start: int, num_envs: int = 2, video_path=None,
                 video_episodes: int = 2) -> dict[str, Any]:
        """Evaluate ``policy`` on every task of the runner, ``episodes`` initial states each (seeds
        ``seed_start`` ...). A suite's report holds ``per_task`` results and their mean as
        ``success_rate``; videos are written per task (``<video stem>_<task>.mp4``) for suites."""
        from embodied_distill.sim.evaluation import evaluate_policy

        reports = []
        for i, spec in enumerate(self.specs):
            path = video_path
            if video_path is not None and self.multi_task:
                p = Path(video_path)
                path = p.with_name(f"{p.stem}_{spec.name}{p.suffix}")
            venv = self.make_vec_env(num_envs=min(num_envs, episodes), task_index=i)
            try:
                rep = evaluate_policy(policy, venv, episodes, seed_start, self.steps_for(i), video_path=path,
                                      video_episodes=video_episodes, desc=f"eval {spec.full_name}")
            finally:
                venv.close()
            rep.update(task=spec.full_name, instruction=spec.instruction)
            reports.append(rep)
        fixed = seed_start == EVAL_SEED_START and episodes <= NUM_EVAL_STATES
        seeds = f"seeds {seed_start}..{seed_start + episodes - 1}"
        once = self.env_configs[0].success_mode == "once"
        meta = {"env_id": f"libero_style/{self.suite}", "control_mode": CONTROL_MODE, "sim_backend": "mujoco",
                "obs_mode": self.obs_mode,
                "initial_states": f"the fixed evaluation set ({seeds})" if fixed else seeds,
                "success_definition": ("goal predicates held at some step (LIBERO: the first success ends "
                                       "the episode)" if once else
                                       "goal predicates hold at the last step of a full-length episode")}
        if not self.multi_task:
            return {**reports[0], **meta}
        return {**aggregate_suite(reports), "task": self.task_name, **meta}


def aggregate_suite(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task evaluation reports -> one suite report (means over tasks; ``per_task`` summaries)."""
    rates = np.array([r["success_rate"] for r in reports])
    keys = ("success_rate", "success_once_rate", "episodes", "mean_episode_length", "max_episode_steps",
            "instruction")
    per_episode = [dict(e, task=r["task"]) for r in reports for e in r["per_episode"]]
    out = {
        "success_rate": float(rates.mean()),
        "success_once_rate": float(np.mean([r["success_once_rate"] for r in reports])),
        "success_stderr": float(np.sqrt(np.sum([r["success_stderr"] ** 2 for r in reports])) / len(reports)),
        "episodes": len(per_episode),
        "mean_return": float(np.mean([r["mean_return"] for r in reports])),
        "mean_episode_length": float(np.mean([r["mean_episode_length"] for r in reports])),
        "latency_ms_per_action_p50": float(np.median([r["latency_ms_per_action_p50"] for r in reports])),
        "latency_ms_per_action_p95": float(np.max([r["latency_ms_per_action_p95"] for r in reports])),
        "latency_ms_per_action_max": float(np.max([r["latency_ms_per_action_max"] for r in reports])),
        "num_envs": reports[0]["num_envs"],
        "max_episode_steps": max(r["max_episode_steps"] for r in reports),
        "seeds": reports[0]["seeds"],
        "per_task": {r["task"]: {k: r[k] for k in keys} for r in reports},
        "per_episode": per_episode,
    }
    videos = [r["video"] for r in reports if "video" in r]
    if videos:
        out["video"] = videos[0]
        out["videos"] = videos
    return out
