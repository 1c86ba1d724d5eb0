"""Gymnasium env wrapper that turns a ManiSkill task into an RL student's environment.

``ManiSkillRLEnv`` observations are the flat layout of :class:`RLPolicyConfig`: the last ``history``
states ``(history * Ds,)`` (the first state repeated at episode start), followed, when a frozen
``base`` policy is given, by the base action ``(Da,)``. With a base, the executed action is
``clip(base_action + residual_scale * action)`` (residual RL); without, the action itself. The base is
driven through its own ``select_action``/``reset``, so it sees its proper observation history.

Episodes run to the step limit (terminations ignored, as in evaluation) and end with ``truncated``;
``info["is_success"]`` (success at the last step) and ``info["episode"]`` (return, length) are set
there for SB3's logger. Reset seeds come from a counter starting at ``seed_start`` unless given, so
training episodes are reproducible and can be kept disjoint from evaluation seeds.
"""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
import torch
from embodied_distill.sim.maniskill import ManiSkillEnvConfig, make_single_env


class ManiSkillRLEnv(gym.Env):
    """One CPU env (ManiSkill, or any runner's ``env_cfg`` with a ``make()``) with observation history and
    an optional frozen base policy."""

    metadata = {"render_modes": []}

    def __init__(self, env_cfg: ManiSkillEnvConfig, history: int = 1, base=None, residual_scale: float = 1.0,
                 seed_start: int = 1_000_000):
        if history < 1:
            raise ValueError("history must be >= 1")
        # a config with ``make()`` (sim/navigation.py's NavEnvConfig) builds its own simulator
        self.env = env_cfg.make() if hasattr(env_cfg, "make") else make_single_env(env_cfg)
        self.history, self.base, self.residual_scale = history, base, float(residual_scale)
        self.next_seed = int(seed_start)
        space = self.env.action_space
        self.low, self.high = np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)
        self.obs_dim = int(np.prod(self.env.observation_space.shape))
        self.action_dim = int(np.prod(space.shape))
        flat = history * self.obs_dim + (self.action_dim if base is not None else 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (flat,), np.float32)
        self.action_space = gym.spaces.Box(self.low, self.high, (self.action_dim,), np.float32)
        self._hist: deque[np.ndarray] = deque(maxlen=history)
        self._base_action = np.zeros(self.action_dim, np.float32)
        self._ret, self._len = 0.0, 0

    def _observe(self, state: np.ndarray) -> np.ndarray:
        state = np.asarray(state, np.float32).reshape(-1)
        self._hist.append(state)
        while len(self._hist) < self.history:
            self._hist.appendleft(state)
        parts = list(self._hist)
        if self.base is not None:
            a = self.base.select_action({"state": torch.from_numpy(state)[None]})
            self._base_action = np.asarray(torch.as_tensor(a).detach().cpu(), np.float32).reshape(-1)
            parts.append(self._base_action)
        return np.concatenate(parts)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed, self.next_seed = self.next_seed, self.next_seed + 1
        obs, info = self.env.reset(seed=int(seed))
        self._hist.clear()
        if self.base is not None:
            self.base.reset()
        self._ret, self._len = 0.0, 0
        return self._observe(obs), {"seed": int(seed)}

    def executed_action(self, action: np.ndarray) -> np.ndarray:
        """(Da,) policy action -> (Da,) action sent to the simulator."""
        action = np.asarray(action, np.float32).reshape(-1)
        if self.base is not None:
            action = self._base_action + self.residual_scale * action
        return np.clip(action, self.low, self.high)

    def step(self, action: np.ndarray):
        obs, reward, _, truncated, info = self.env.step(self.executed_action(action))
        reward = float(np.asarray(reward).reshape(-1)[0])
        self._ret += reward
        self._len += 1
        success = bool(np.asarray(info.get("success", False)).reshape(-1)[0])
        out = {"success": success}
        truncated = bool(np.asarray(truncated).reshape(-1)[0])
        if truncated:
            out["is_success"] = success
            out["episode"] = {"r": self._ret, "l": self._len, "t": 0.0}
        return self._observe(obs), reward, False, truncated, out

    def close(self) -> None:
        self.env.close()
