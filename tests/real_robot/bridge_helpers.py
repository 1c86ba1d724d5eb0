"""Helpers of the robot-bridge tests: tiny policies, a scripted goal seeker, task configs."""

from __future__ import annotations

import numpy as np
import torch
from embodied_distill.policies.base import build_policy

from embodied_distill.data.normalizer import Normalizer

PICKCUBE_TASK = {"name": "pickcube", "sim": "maniskill", "env_id": "PickCube-v1", "obs_mode": "state",
                 "control_mode": "pd_ee_delta_pose", "max_episode_steps": 50, "robot_uids": "panda",
                 "expert": "scripted"}


def tiny_mlp(obs_dim: int = 7, action_dim: int = 7, obs_horizon: int = 2, action_horizon: int = 8,
             n_action_steps: int = 4, seed: int = 0):
    """A small random MLP policy with a fitted normaliser (actions roughly in [-1, 1])."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = {"state": rng.normal(size=(256, obs_dim)).astype(np.float32),
            "action": rng.uniform(-1, 1, size=(256, action_dim)).astype(np.float32)}
    return build_policy("mlp", {"obs_dim": obs_dim, "action_dim": action_dim, "obs_horizon": obs_horizon,
                                "action_horizon": action_horizon, "n_action_steps": n_action_steps,
                                "hidden_dims": [32, 32]}, Normalizer.fit(data)).eval()


class ScriptedConfig:
    def __init__(self, obs_horizon=2, action_horizon=8, n_action_steps=4, action_dim=7):
        self.obs_keys = ("state",)
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        self.n_action_steps, self.action_dim, self.obs_dim = n_action_steps, action_dim, 7


class GoalSeeker:
    """Scripted point-mass policy: chunks that step toward the goal in ``state`` ([ee, grip, goal])."""

    name = "goal_seeker"

    def __init__(self, step_m: float = 0.05, **cfg):
        self.config = ScriptedConfig(**cfg)
        self.step_m = step_m
        self.calls = 0

    def reset(self):
        pass

    def predict_action_chunk(self, obs):
        self.calls += 1
        s = torch.as_tensor(obs["state"])[:, -1].double()  # (B, 7)
        ee, goal = s[:, :3], s[:, 4:7]
        chunk = torch.zeros(s.shape[0], self.config.action_horizon, 7, dtype=torch.float64)
        pos = ee.clone()
        for j in range(self.config.action_horizon):
            step = torch.clamp((goal - pos) / self.step_m, -1, 1)
            chunk[:, j, :3] = step
            chunk[:, j, 6] = 1.0
            pos = pos + step * self.step_m
        return chunk.float()

    def select_action(self, obs):
        hist = {"state": torch.as_tensor(obs["state"])[:, None].repeat(1, self.config.obs_horizon, 1)}
        return self.predict_action_chunk(hist)[:, 0]


