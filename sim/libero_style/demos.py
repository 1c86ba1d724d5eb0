"""Scripted-expert demonstrations of LIBERO-style tasks into an EpisodeStore, parallel and resumable.

Mirrors ``embodied_distill.data.collect`` (episodes appended in seed order, failed episodes counted and
dropped, a rerun continues after the last stored seed, a store made with other settings is refused)
and adds what a language-conditioned suite needs: several tasks in one store (seed ``s`` runs task
``s % num_tasks``), the instruction and task index saved per episode (``meta/instruction``,
``meta/task``), and optional RGB frames (``data/rgb``).

Episodes are recorded LIBERO-style: they end ``tail_steps`` control steps after the goal first holds
(LIBERO's human demonstrations also stop at success), or at the step limit (then they failed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from embodied_distill.data.collect import open_demo_store, striped_imap
from embodied_distill.progress import progress

EVAL_SEED_START = 100_000
"""First seed of the fixed evaluation initial states; demonstrations never use a seed at or above it."""
NUM_EVAL_STATES = 50
"""Evaluation initial states per task (LIBERO ships 50): seeds EVAL_SEED_START ... + 49."""


def run_expert_episode(env, seed: int, noise_std: float = 0.0, noise_prob: float = 0.0,
                       tail_steps: int = 10, record_rgb: bool = False) -> dict[str, Any]:
    """Roll out the task's scripted expert once in ``env`` (a ``LiberoStyleEnv``).

    DART-style noise: with probability ``noise_prob`` a step's *executed* translation gets Gaussian noise
    (std ``noise_std`` in action units); the recorded label is the clean expert action.

    Returns ``{"state": (T, D) float32, "action": (T, 7) float32, ["rgb": (T, 2, H, W, 3) uint8],
    "success": bool, "seed": int, "first_success": int | None}``.
    """
    from embodied_distill.sim.libero_style.experts import ScriptedExpert

    if noise_std < 0 or not 0 <= noise_prob <= 1:
        raise ValueError("noise_std must be >= 0 and noise_prob in [0, 1]")
    expert = ScriptedExpert(env.task)
    rng = np.random.default_rng([int(seed), 7_919])
    obs, _ = env.reset(seed=int(seed))
    states, actions, frames = [], [], []
    first = None
    limit = env.max_episode_steps
    for t in range(limit):
        a = expert.act(env.scene)
        executed = a.copy()
        if noise_prob > 0 and first is None and t < limit - 10 and rng.random() < noise_prob:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, noise_std, 3), -1.0, 1.0)
        states.append(obs["state"])
        actions.append(a.astype(np.float32))
        if record_rgb:
            frames.append(obs["rgb"])
        obs, _, _, truncated, info = env.step(executed)
        if info["goal_now"] and first is None:
            first = t
        if (first is not None and t >= first + tail_steps) or truncated:
            break
    out = {"state": np.stack(states), "action": np.stack(actions), "success": bool(info["success"]),
           "seed": int(seed), "first_success": first}
    if record_rgb:
        out["rgb"] = np.stack(frames)
    return out


# ------------------------------------------------------------------------------ worker processes
_ENVS: dict[int, Any] = {}
_SETUP: dict[str, Any] = {}


def _set_up(setup: Mapping[str, Any]) -> None:
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()
    _SETUP.clear()
    _SETUP.update(setup)


def _init_worker(setup: Mapping[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)  # workers must not fight the main process for the cores
    _set_up(setup)


def _env_for(task_index: int):
    from embodied_distill.sim.libero_style.env import LiberoStyleEnv

    if task_index not in _ENVS:
        s = _SETUP
        _ENVS[task_index] = LiberoStyleEnv(s["specs"][task_index], s["env_configs"][task_index],
                                           max_episode_steps=s["max_steps"][task_index])
    return _ENVS[task_index]


def _episode(seed: int) -> dict[str, Any]:
    s = _SETUP
    task_index = seed % len(s["specs"])
    ep = run_expert_episode(_env_for(task_index), seed, s["noise_std"], s["noise_prob"], s["tail_steps"],
                            s["record_rgb"])
    ep["task"] = task_index
    return ep


def collect_demos(store_path: str | Path, setup: Mapping[str, Any], n_episodes: int, seed_start: int = 0,
                  num_workers: int = 2, attrs: Mapping[str, Any] | None = None,
                  max_attempts_factor: float = 3.0, desc: str = "demos") -> dict[str, Any]:
    """Collect until the store holds ``n_episodes`` successful episodes (over all tasks together).

    Args:
        setup: ``{"specs": [TaskSpec], "env_configs": [LiberoStyleEnvConfig], "max_steps": [int],
            "noise_std", "noise_prob", "tail_steps", "record_rgb"}``: everything a worker needs (picklable).
        num_workers: processes (forkserver); 0 or 1 runs in this process.
        attrs: generation settings saved in the store; a store made with other settings is refused.
        max_attempts_factor: give up after ``n_episodes * factor`` attempts (expert failing too often).

    Returns ``{"stored", "attempted", "successes", "resumed_from", "per_task_success"}``.
    """
    if n_episodes < 1:
        raise ValueError("n_episodes must be >= 1")
    store, have, next_seed = open_demo_store(store_path, attrs, seed_start)
    summary: dict[str, Any] = {"stored": have, "attempted": 0, "successes": 0, "resumed_from": have}
    todo = n_episodes - have
    if todo <= 0:
        return summary
    seeds = range(next_seed, next_seed + int(np.ceil(todo * max_attempts_factor)))
    if seeds[-1] >= EVAL_SEED_START:
        raise ValueError(f"demo seeds {seeds[0]}..{seeds[-1]} would reach the evaluation initial states "
                         f"(seeds >= {EVAL_SEED_START}); lower demos.seed_start or demos.n_episodes")
    n_tasks = len(setup["specs"])
    tried, won = np.zeros(n_tasks, int), np.zeros(n_tasks, int)
    bar = progress(total=n_episodes, initial=have, desc=desc, unit="ep")

    def consume(ep: dict[str, Any]) -> bool:
        summary["attempted"] += 1
        tried[ep["task"]] += 1
        if ep["success"]:
            summary["successes"] += 1
            won[ep["task"]] += 1
            data = {"state": ep["state"], "action": ep["action"]}
            if "rgb" in ep:
                data["rgb"] = ep["rgb"]
            spec = setup["specs"][ep["task"]]
            store.add_episode(data, meta={"seed": ep["seed"], "task": ep["task"],
                                          "instruction": spec.instruction})
            bar.update(1)
        bar.set_postfix(expert_success=f"{summary['successes'] / summary['attempted']:.2f}", refresh=False)
        return store.n_episodes >= n_episodes

    if num_workers <= 1:
        _set_up(setup)
        try:
            for seed in seeds:
                if consume(_episode(seed)):
                    break
        finally:
            _set_up({})
    else:
        for ep in striped_imap(_episode, seeds, num_workers, _init_worker, (dict(setup),)):
            if consume(ep):
                break
    bar.close()
    summary["stored"] = store.n_episodes
    summary["per_task_success"] = {setup["specs"][i].name: f"{won[i]}/{tried[i]}" for i in range(n_tasks)
                                   if tried[i]}
    if store.n_episodes < n_episodes:
        raise RuntimeError(f"expert succeeded only {summary['successes']}/{summary['attempted']} times "
                           f"({summary['per_task_success']}); store has {store.n_episodes} < {n_episodes}")
    return summary
