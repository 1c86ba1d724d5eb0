"""Seeded headless evaluation shared by every runner.

Episodes run in waves of ``num_envs`` with per-episode seeds ``seed_start + i``; every episode runs to
the env's step limit (terminations ignored) and its success is the env's success flag at the last
step ("success at episode end", as ManiSkill's ``success_at_end``). ``success_once`` (success at any
step) is reported too. Episode length is the first step at which success held (the limit if never).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from embodied_distill.progress import progress


class VecEnv(Protocol):
    """``reset``/``step`` return the state array (N, D), or a dict of arrays (see ``policy_obs``)."""

    num_envs: int

    def reset(self, seeds: list[int]) -> np.ndarray | Mapping[str, Any]: ...
    def step(self, actions: np.ndarray) -> tuple[np.ndarray | Mapping[str, Any], np.ndarray, np.ndarray]: ...
    def render(self, i: int = 0) -> np.ndarray: ...


class NonFiniteActionError(RuntimeError):
    """The policy produced NaN or inf actions."""


def policy_obs(obs: np.ndarray | Mapping[str, Any]) -> dict[str, Any]:
    """A vector env's observation -> the dict ``policy.select_action`` takes.

    An array is the state: ``{"state": (N, D) tensor}``. A dict (runners with images or instructions,
    e.g. ``{"state": (N, D), "rgb": (N, V, H, W, 3), "instruction": [N strings]}``) is passed key by key:
    numpy arrays become tensors, anything else (the instruction strings) is passed unchanged.
    """
    if isinstance(obs, Mapping):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                for k, v in obs.items()}
    return {"state": torch.from_numpy(obs)}


def evaluate_policy(policy, venv: VecEnv, episodes: int, seed_start: int, max_steps: int,
                    video_path: str | Path | None = None, video_episodes: int = 2, fps: int = 20,
                    desc: str = "eval") -> dict[str, Any]:
    """Run ``episodes`` seeded episodes; returns a report dict (per-episode lists + summary)."""
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    n = venv.num_envs
    per_episode: list[dict[str, Any]] = []
    step_ms: list[float] = []
    frames: list[np.ndarray] = []
    bar = progress(total=episodes, desc=desc, unit="ep")
    for wave_start in range(0, episodes, n):
        seeds = [seed_start + wave_start + i for i in range(n)]  # extra envs of the last wave are dropped
        obs = venv.reset(seeds)
        policy.reset()
        ret = np.zeros(n)
        once = np.zeros(n, bool)
        first = np.full(n, max_steps)
        success = np.zeros(n, bool)
        record = video_path is not None and wave_start < video_episodes
        for t in range(max_steps):
            t0 = time.perf_counter()
            action = policy.select_action(policy_obs(obs))
            step_ms.append((time.perf_counter() - t0) * 1e3)
            action = action.detach().cpu().numpy() if torch.is_tensor(action) else np.asarray(action)
            if not np.isfinite(action).all():
                raise NonFiniteActionError(f"policy produced non-finite actions at step {t} of seeds {seeds}")
            if record:
                frames.append(venv.render(0))
            obs, rew, success = venv.step(action)
            ret += rew
            first = np.where(success & ~once, t + 1, first)
            once |= success
        for i in range(min(n, episodes - wave_start)):
            per_episode.append({"seed": seeds[i], "success": bool(success[i]), "success_once": bool(once[i]),
                                "return": float(ret[i]), "length": int(first[i])})
        bar.update(min(n, episodes - wave_start))
        rate = np.mean([e["success"] for e in per_episode])
        bar.set_postfix(success=f"{rate:.2f}", refresh=False)
    bar.close()
    report = summarize(per_episode, step_ms)
    report["num_envs"] = n
    report["max_episode_steps"] = max_steps
    if video_path is not None and frames:
        try:
            import imageio.v2 as imageio

            Path(video_path).parent.mkdir(parents=True, exist_ok=True)
            imageio.mimsave(str(video_path), frames, fps=fps)
            report["video"] = str(video_path)
        except Exception as e:  # a missing ffmpeg must not lose the evaluation
            report["video_error"] = repr(e)
    return report


def label_rollouts(env, policy, expert_for, episodes: int, seed_start: int, max_steps: int,
                   desc: str = "dagger") -> dict[str, Any]:
    """DAgger rows: ``policy`` acts on ``episodes`` seeded episodes of one gym-API ``env`` (seeds
    ``seed_start + i``), and the expert labels every state it visits.

    ``expert_for(env)`` is called after each reset and returns a zero-argument callable giving the
    expert's (Da,) action at the env's current state (a reactive expert: a function of the simulator
    state). ``policy.select_action({"state": (1, Do)}) -> (1, Da)``; its actions are clipped to the action
    space. Returns ``{"state": (N, Do), "action": (N, Da) expert labels, "successes": int}`` (the policy's
    successes at the last step).
    """
    low = np.asarray(env.action_space.low, np.float32).reshape(-1)
    high = np.asarray(env.action_space.high, np.float32).reshape(-1)
    states, labels, successes = [], [], 0
    bar = progress(total=episodes, desc=desc, unit="ep")
    for i in range(episodes):
        seed = seed_start + i
        obs, _ = env.reset(seed=seed)
        expert = expert_for(env)
        policy.reset()
        success = False
        for _ in range(max_steps):
            state = np.asarray(obs, np.float32).reshape(-1)
            states.append(state)
            labels.append(np.asarray(expert(), np.float32).reshape(-1))
            with torch.no_grad():
                action = policy.select_action({"state": torch.from_numpy(state)[None]})
            action = np.asarray(torch.as_tensor(action).cpu(), np.float32).reshape(-1)
            if not np.isfinite(action).all():
                raise NonFiniteActionError(f"the policy produced a non-finite action on seed {seed}")
            obs, _, _, trunc, info = env.step(np.clip(action, low, high))
            success = bool(np.asarray(info["success"]).reshape(-1)[0])
            if bool(np.asarray(trunc).reshape(-1)[0]):
                break
        successes += success
        bar.update(1)
        bar.set_postfix(success=f"{successes / (i + 1):.2f}", refresh=False)
    bar.close()
    return {"state": np.stack(states), "action": np.stack(labels), "successes": successes}


def summarize(per_episode: list[dict[str, Any]], step_ms: list[float]) -> dict[str, Any]:
    succ = np.array([e["success"] for e in per_episode], float)
    lat = np.asarray(step_ms) if step_ms else np.zeros(1)
    return {
        "success_rate": float(succ.mean()),
        "success_once_rate": float(np.mean([e["success_once"] for e in per_episode])),
        "success_stderr": float(succ.std(ddof=0) / np.sqrt(len(succ))),
        "episodes": len(per_episode),
        "mean_return": float(np.mean([e["return"] for e in per_episode])),
        "mean_episode_length": float(np.mean([e["length"] for e in per_episode])),
        "latency_ms_per_action_p50": float(np.percentile(lat, 50)),
        "latency_ms_per_action_p95": float(np.percentile(lat, 95)),
        "latency_ms_per_action_max": float(lat.max()),
        "seeds": [e["seed"] for e in per_episode],
        "per_episode": per_episode,
    }
